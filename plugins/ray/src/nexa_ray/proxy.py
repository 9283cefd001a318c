"""The stand-in backend: one model's replicas behind the ordinary async Backend interface.

``RayBackend`` is what the ``ModelManager`` holds for a model under ``--engine ray``.
``start`` creates the model's replicas as named detached actors, or reattaches to the
ones a previous server left running (same name and same load fingerprint: no reload).
Each request goes to the least-loaded healthy replica. A replica lost before any of
the answer was handed on is replaced by another for that request; a stream that
already handed on text ends with an error (never text spliced from two runs). A
background poll reads every replica's status (health, load, node, the backend's own
figures), so ``runtime_metrics`` and ``replicas`` answer from memory without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayError, RayTaskError

from nexa.backend import Backend, LoadOptions
from nexa.errors import Busy, ModelLoadError, NexaError
from nexa.types import (
    BackendMetric,
    ChatChunk,
    ChatRequest,
    Device,
    EmbedRequest,
    EmbedResult,
    ImageRequest,
    ImageResult,
    Manifest,
)
from nexa_ray.replica import Outcome, Replica, ReplicaSpec, ReplicaStatus

if TYPE_CHECKING:
    from nexa_ray.engine import RayEngine

log = logging.getLogger("nexa.ray")

HEALTHY_WAIT = 30.0
"""Seconds a request waits for a healthy replica before it gets 503 + Retry-After."""
STATUS_TIMEOUT = 5.0
"""Seconds a status poll may take before the replica counts as unresponsive."""
REATTACH_TIMEOUT = 30.0
"""Seconds a starting server waits for an existing replica to say what it has loaded."""
ACTOR_CONCURRENCY = 1000
"""Calls an actor takes at once: requests wait in the backend's own queue, and status
polls must never wait behind them."""
REPLICA_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}
"""Ray starts its workers at nice 15 so they yield to its own daemons. A replica is the
node's main work, the process the model's compute threads run in (as the server's own
process is in-process): at nice 15 every other process on the node (the server, Ray's
daemons, anything else) gets ~28 times its CPU share, and llama.cpp's threads, which
wait for each other at every step, stall whenever one is preempted. Ray's own job
supervisor runs at 0 the same way (the worker applies the setting to itself: no
privilege needed)."""


@functools.cache
def _actor_class() -> Any:
    """``Replica`` as a Ray actor class, made once (each one is exported to the cluster)."""
    return ray.remote(Replica)


async def _value(ref: Any) -> Any:
    """The value of a streamed item the generator handed out.

    The generator hands an item out once it is ready here (it waited for it), so a
    non-blocking read takes it from this process's memory: ``await ref`` would fetch it
    again through Ray's I/O thread and wake the event loop once more, per item. An item
    not here yet (a large one kept in a remote object store) is awaited as usual.
    """
    try:
        return ray.get(ref, timeout=0)
    except GetTimeoutError:
        return await ref


class ReplicaLost(Busy):
    """The replica running a request was lost; retrying the request is safe."""

    code = "replica_lost"


@attrs.frozen
class ReplicaInfo:
    """One replica as ``nexa ps`` and the loaded-model listing show it."""

    name: str
    """The actor's name in the Ray namespace (``nexa/<model>/<backend>/<index>``)."""
    model: str
    backend: str
    index: int
    state: str
    """``starting``, ``ready``, ``loading``, ``unavailable`` (restarting, unreachable),
    ``failed`` (its load raised) or ``stopped``."""
    node_id: str
    node_ip: str
    pid: int
    """The replica's process on its node (0 before it first reported)."""
    resources: dict[str, float]
    in_flight: int
    """Requests this server has running on it."""
    active: int
    """Requests running in the replica as it last reported (from every server)."""
    parallel: int
    """Requests the loaded backend runs at once."""
    served: int
    """Requests it finished since its process started."""
    loads: int
    loaded_at: float | None
    restarts: int
    """Restarts this server saw (a new process behind the same name)."""
    error: str | None = None


@attrs.define(eq=False)
class _Replica:
    """The proxy's view of one replica."""

    name: str
    index: int
    handle: Any
    state: str = "starting"
    status: ReplicaStatus | None = None
    in_flight: int = 0
    restarts: int = 0
    error: str | None = None
    picked: int = 0
    """When it was last chosen (a sequence number): ties go to the least recent."""

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def load(self) -> float:
        slots = max(1, self.status.parallel if self.status else 1)
        return self.in_flight / slots


class RayBackend(Backend):
    """A model's replicas on Ray, served as one backend (see the module docstring)."""

    def __init__(
        self, engine: RayEngine, cls: type[Backend], manifest: Manifest, device: Device, options: LoadOptions
    ) -> None:
        # No Backend.__init__: this object runs no model work itself (no worker threads).
        self.engine = engine
        self.backend_cls = cls
        self.name = cls.name
        self.tasks = cls.tasks
        self.manifest = manifest
        self.device = device
        self.options = options
        self.replica_count = engine.options.replicas_for(manifest.name)
        # The backend's own figure per replica, as it would be in-process: a probe instance
        # reads it (a Backend's constructor loads nothing).
        self.per_replica = max(1, cls(manifest, device, options).parallel)
        self.parallel = self.per_replica * self.replica_count
        # Stop strings: the server cuts answers (stream_answer) exactly as for the backend itself.
        self.stops_natively = cls.stops_natively
        # And refuses or runs the same request features (logprobs, reasoning switches...).
        self.capabilities = cls.capabilities
        self._replicas: list[_Replica] = []
        self._poller: asyncio.Task[None] | None = None
        self._picks = 0
        self._stopped = False
        self._namespace = engine.options.namespace
        self._fingerprint = self._spec(0).fingerprint
        """Of what every replica of this model must have loaded (the index is not in it)."""

    # --- names and specs ------------------------------------------------------------

    def _actor_name(self, index: int) -> str:
        return f"nexa/{self.manifest.name}/{self.name}/{index}"

    def _spec(self, index: int) -> ReplicaSpec:
        return ReplicaSpec(
            model=self.manifest.name,
            index=index,
            backend_cls=self.backend_cls,
            manifest=self.manifest,
            options=self.options,
            device=self.engine.config.device,
        )

    def _actor_options(self) -> dict[str, Any]:
        out = self.engine.options.actor_options_for(
            self.manifest.name, threads=self.options.threads, gpu=self.engine.config.device == "cuda"
        )
        if "label_selector" in out:
            out["label_selector"] = dict(out["label_selector"])
        return out

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._replicas = await asyncio.to_thread(self._attach_all)
        outcomes = await asyncio.gather(*(self._await_loaded(r) for r in self._replicas))
        ready = [r for r in self._replicas if r.ready]
        if not ready:
            errors = [o for o in outcomes if o]
            await self._kill_all()
            if errors and all(isinstance(e, NexaError) for e in errors):
                raise errors[0]
            raise ModelLoadError(
                f"no replica of {self.manifest.name!r} started: "
                + ("; ".join(str(e) for e in errors) or "none could be placed in time")
            )
        if len(ready) < len(self._replicas):
            log.warning("%s: %d of %d replicas ready; the others join when they are",
                        self.manifest.name, len(ready), len(self._replicas))
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name=f"ray poll {self.manifest.name}")

    def _attach_all(self) -> list[_Replica]:
        """Reattach to (or create) replicas 0..N-1 and remove surplus ones left by an
        earlier server that ran more."""
        replicas = [self._attach(i) for i in range(self.replica_count)]
        prefix = f"nexa/{self.manifest.name}/{self.name}/"
        wanted = {r.name for r in replicas}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry.get("name", "")
            if entry.get("namespace") == self._namespace and name.startswith(prefix) and name not in wanted:
                with contextlib.suppress(ValueError, RayError):
                    ray.kill(ray.get_actor(name, namespace=self._namespace), no_restart=True)
                    log.info("removed surplus replica %s", name)
        return replicas

    def _attach(self, index: int) -> _Replica:
        name = self._actor_name(index)
        spec = self._spec(index)
        try:
            handle = ray.get_actor(name, namespace=self._namespace)
        except ValueError:
            handle = None
        if handle is not None:
            try:
                status = ray.get(handle.status.remote(), timeout=REATTACH_TIMEOUT)
            except (RayError, GetTimeoutError) as exc:
                # Restarting or waiting for a node: it is still the replica of that name;
                # the poll sees it back (and a wrong fingerprint is caught at load).
                log.warning("replica %s exists but does not answer (%s); keeping it", name, type(exc).__name__)
                return _Replica(name, index, handle, state="unavailable")
            if status.fingerprint == self._fingerprint:
                log.info("reattached to replica %s on node %s", name, status.node_ip)
                replica = _Replica(name, index, handle)
                self._take_status(replica, status)
                return replica
            # Loaded with other settings (another --ctx, another model file): replace it.
            log.info("replacing replica %s (loaded with other settings)", name)
            with contextlib.suppress(RayError):
                ray.kill(handle, no_restart=True)
        return _Replica(name, index, self._create(name, spec))

    def _create(self, name: str, spec: ReplicaSpec) -> Any:
        return _actor_class().options(
            name=name,
            namespace=self._namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=0,  # a retried stream would re-run from its start: splice
            max_concurrency=ACTOR_CONCURRENCY,
            runtime_env=REPLICA_RUNTIME_ENV,
            **self._actor_options(),
        ).remote(spec)

    async def _await_loaded(self, replica: _Replica) -> BaseException | None:
        """Wait for the replica to be placed and loaded; the error that kept it from it."""
        deadline = time.monotonic() + self.engine.options.start_timeout
        outcome: Outcome | None = None
        while outcome is None and time.monotonic() < deadline:
            try:
                outcome = await asyncio.wait_for(replica.handle.ensure_loaded.remote(), deadline - time.monotonic())
            except ActorUnavailableError:  # restarting: calls fail at once until it is back
                await asyncio.sleep(0.5)
            except TimeoutError:
                break
            except RayError as exc:
                replica.state, replica.error = "unavailable", type(exc).__name__
                return exc
        if outcome is None:
            replica.state = "unavailable"
            replica.error = "not placed or loaded in time (does the cluster have the resources it asks for?)"
            return NexaError(f"replica {replica.name}: {replica.error}")
        if outcome.error is not None:
            replica.state, replica.error = "failed", str(outcome.error)
            return outcome.error
        self._take_status(replica, outcome.value)
        return None

    async def stop(self) -> None:
        self._stopped = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.engine.detached:
            return  # the replicas stay loaded for the next server (named, detached)
        await self._kill_all()

    async def _kill_all(self) -> None:
        for replica in self._replicas:
            with contextlib.suppress(RayError, TimeoutError):
                await asyncio.wait_for(replica.handle.close.remote(), STATUS_TIMEOUT)
            with contextlib.suppress(RayError):
                ray.kill(replica.handle, no_restart=True)
            replica.state = "stopped"

    # --- health and figures -----------------------------------------------------------

    def _take_status(self, replica: _Replica, status: ReplicaStatus) -> None:
        if status.fingerprint != self._fingerprint:
            # Another server replaced it with other settings: not ours to send requests to.
            replica.state, replica.error = "failed", "loaded with other settings by another server"
            return
        previous = replica.status
        if previous is not None and previous.pid != status.pid:
            replica.restarts += 1
            log.warning("replica %s restarted (node %s)", replica.name, status.node_ip)
        replica.status = status
        if status.loaded:
            replica.state, replica.error = "ready", None
        elif status.load_error:
            replica.state, replica.error = "failed", status.load_error
        else:
            replica.state = "loading"

    async def _poll(self) -> None:
        interval = self.engine.options.poll_interval
        while not self._stopped:
            await asyncio.gather(*(self._poll_one(r) for r in self._replicas))
            await asyncio.sleep(interval)

    async def _poll_one(self, replica: _Replica) -> None:
        try:
            status = await asyncio.wait_for(replica.handle.status.remote(), STATUS_TIMEOUT)
        except ActorDiedError:
            # Killed for good (restarts are unlimited otherwise): make it again.
            replica.state = "unavailable"
            replica.restarts += 1
            log.warning("replica %s died; creating it again", replica.name)
            replica.handle = await asyncio.to_thread(self._create, replica.name, self._spec(replica.index))
            return
        except (RayError, TimeoutError) as exc:
            if replica.state != "unavailable":
                log.warning("replica %s is unavailable (%s)", replica.name, type(exc).__name__)
            replica.state = "unavailable"
            return
        self._take_status(replica, status)

    def runtime_metrics(self) -> list[BackendMetric]:
        """Every replica's own figures and the engine's, labelled by replica and node,
        from the last poll (never waits)."""
        out = [BackendMetric("ray_replicas_ready", sum(r.ready for r in self._replicas),
                             help="Replicas of the model that take requests")]
        for r in self._replicas:
            labels = {"replica": r.name, "node": r.status.node_id if r.status else ""}
            out.append(BackendMetric("ray_replica_ready", float(r.ready), help="1 if the replica takes requests",
                                     labels=labels))
            out.append(BackendMetric("ray_replica_in_flight", r.in_flight,
                                     help="Requests this server has on the replica", labels=labels))
            out.append(BackendMetric("ray_replica_restarts", r.restarts, "counter",
                                     help="Replica restarts this server saw", labels=labels))
            if r.status is not None:
                out.append(BackendMetric("ray_replica_active", r.status.active,
                                         help="Requests running in the replica", labels=labels))
                out.extend(attrs.evolve(m, labels={**m.labels, **labels}) for m in r.status.figures)
        return out

    def replicas(self) -> list[ReplicaInfo]:
        """The model's replicas now: node, resources, load and state (never waits)."""
        out = []
        for r in self._replicas:
            s = r.status
            out.append(ReplicaInfo(
                name=r.name, model=self.manifest.name, backend=self.name, index=r.index, state=r.state,
                node_id=s.node_id if s else "", node_ip=s.node_ip if s else "", pid=s.pid if s else 0,
                resources=dict(s.resources) if s else {}, in_flight=r.in_flight,
                active=s.active if s else 0, parallel=s.parallel if s else 0, served=s.served if s else 0,
                loads=s.loads if s else 0, loaded_at=s.loaded_at if s else None,
                restarts=r.restarts, error=r.error,
            ))
        return out

    # --- routing ----------------------------------------------------------------------

    async def _choose(self, tried: set[str]) -> _Replica:
        """The least-loaded healthy replica not yet tried for this request."""
        deadline = time.monotonic() + HEALTHY_WAIT
        while True:
            ready = [r for r in self._replicas if r.ready and r.name not in tried]
            if ready:
                replica = min(ready, key=lambda r: (r.load(), r.picked))
                self._picks += 1
                replica.picked = self._picks
                return replica
            if tried and not [r for r in self._replicas if r.name not in tried]:
                raise ReplicaLost(f"every replica of {self.manifest.name!r} failed this request; try again",
                                  retry_after=1)
            if time.monotonic() > deadline or self._stopped:
                raise Busy(f"no replica of {self.manifest.name!r} is healthy now; try again shortly",
                           retry_after=5)
            # Waiting on the poll's view of the replicas (a loop-free wait: the proxy may be
            # driven from several event loops, e.g. by the conformance kit).
            await asyncio.sleep(min(0.1, self.engine.options.poll_interval))

    def _lost(self, replica: _Replica, exc: BaseException) -> None:
        if replica.state == "ready":
            log.warning("replica %s lost mid-request (%s)", replica.name, type(exc).__name__)
        replica.state = "unavailable"

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        tried: set[str] = set()
        while True:
            replica = await self._choose(tried)
            tried.add(replica.name)
            replica.in_flight += 1
            stream = replica.handle.chat.remote(request)
            sent = finished = False
            try:
                async for ref in stream:
                    chunks, error = await _value(ref)
                    for chunk in chunks:
                        sent = True
                        yield chunk
                    if error is not None:
                        finished = True
                        raise error
                finished = True
                return
            except RayActorError as exc:
                finished = True
                self._lost(replica, exc)
                if sent:
                    raise ReplicaLost(
                        f"replica {replica.name} of {self.manifest.name!r} was lost mid-answer; "
                        "the answer is incomplete: ask again", retry_after=1,
                    ) from None
                log.info("retrying a chat on another replica than %s", replica.name)
            except RayTaskError as exc:
                finished = True
                raise NexaError(f"replica {replica.name} failed: {type(exc.cause).__name__}") from None
            finally:
                replica.in_flight -= 1
                if not finished:
                    # Closed early (client gone, stop string): the replica stops generating.
                    with contextlib.suppress(Exception):
                        ray.cancel(stream)

    async def run_embed(self, request: EmbedRequest) -> EmbedResult:
        return await self._call("embed", request)

    async def run_images(self, request: ImageRequest) -> ImageResult:
        return await self._call("images", request)

    async def _call(self, method: str, request: Any) -> Any:
        """One-shot work: safe to retry on another replica when its replica is lost."""
        tried: set[str] = set()
        while True:
            replica = await self._choose(tried)
            tried.add(replica.name)
            replica.in_flight += 1
            ref = getattr(replica.handle, method).remote(request)
            try:
                outcome: Outcome = await ref
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
                raise
            except RayActorError as exc:
                self._lost(replica, exc)
                continue
            except RayTaskError as exc:
                raise NexaError(f"replica {replica.name} failed: {type(exc.cause).__name__}") from None
            finally:
                replica.in_flight -= 1
            if outcome.error is not None:
                raise outcome.error
            return outcome.value
