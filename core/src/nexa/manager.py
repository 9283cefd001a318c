"""Loaded models: single-flight loading, per-model slots and queues, keep-alive, LRU
eviction, and what an operator does by hand (load, unload, pin).

The ``ModelManager`` turns a client's ``model`` string and a task into a loaded backend
instance. Concurrent requests for an unloaded model cause exactly one load; each model
runs ``backend.parallel`` requests at once and lets at most ``queue_size`` more wait
(the rest get 503 with Retry-After). Loading a model that would exceed the memory budget
evicts least-recently-used idle models first; a model in use is never evicted. With an
engine (``--engine``, see ``nexa.engine``) the backend instance is the engine's stand-in
for the model, and all of this applies to it unchanged.

Every request holds a ``Lease`` on its model from the moment it waits for a slot until
it leaves. An idle model unloads after its keep-alive: the server's (``--keepalive``)
until a load or a request (Ollama's ``keep_alive``) sets the model's own; 0 unloads right
after the request, a negative value never. A pinned model is exempt from LRU eviction
and keep-alive unloads. Unloading by hand waits for the model's leases to end, or (mode
``cancel``) revokes them: each request's task is cancelled, its backend work stops, and
its client gets ``ModelUnloaded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal

import attrs

from nexa.backend import Backend, LoadOptions
from nexa.config import CATCH_ALL_ALIAS, DRAFT_WORDS, ServerConfig
from nexa.engine import create_engine
from nexa.errors import (
    BadRequest,
    Busy,
    Conflict,
    ModelLoadError,
    ModelNotFound,
    ModelNotLoaded,
    ModelUnloaded,
    NexaError,
    UnsupportedTask,
)
from nexa.metrics import BackendCollector, Metrics
from nexa.registry import BackendRegistry
from nexa.store import ModelStore, split_quant
from nexa.types import Device, Manifest, Task

log = logging.getLogger("nexa.manager")
MAX_NAMES_SHOWN = 20
"""Model names a not-found error lists at most."""

_TASK_WORDS = {
    Task.CHAT: "a chat model",
    Task.VLM: "a vision (image+text) model",
    Task.EMBED: "an embedding model",
    Task.IMAGE: "an image generation model",
    Task.RERANK: "a reranker or embedding model",
    Task.TRANSCRIBE: "a speech-to-text model",
}
LOAD_ORDER = (Task.CHAT, Task.EMBED, Task.RERANK, Task.TRANSCRIBE, Task.IMAGE, Task.VLM)
"""The task a model is loaded for when no request names one (``nexa serve MODEL``, a load)."""

UnloadMode = Literal["wait", "cancel"]


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@attrs.define(eq=False)
class LoadedModel:
    """One model resident in memory, served by one backend instance."""

    key: tuple[str, str]
    """(model name, backend name)."""
    manifest: Manifest
    backend: Backend
    options: LoadOptions
    """What the backend was built with (the server's settings or a load's)."""
    ready: asyncio.Future[None]
    slots: asyncio.Semaphore
    active: int = 0
    waiting: int = 0
    last_used: float = attrs.field(factory=time.monotonic)
    keep_alive: float | None = None
    """Seconds this model stays loaded when idle (<0: forever); None: the server's default."""
    pinned: bool = False
    unloading: asyncio.Task[None] | None = None
    """The unload under way by request, if any; new requests wait for it, then load anew."""
    leases: set[Lease] = attrs.field(factory=set)
    drained: asyncio.Event = attrs.field(factory=_set_event)
    """Set while no lease is held."""
    gone: asyncio.Event = attrs.field(factory=asyncio.Event)
    """Set once the model has left memory (or failed to load)."""

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0 or not self.ready.done()

    @property
    def state(self) -> str:
        if self.unloading is not None:
            return "unloading"
        return "ready" if self.ready.done() else "loading"


class Lease:
    """One request's hold on a model, from waiting for a slot until it leaves.

    ``ModelManager.acquire`` makes one; ``async with lease as backend`` waits for the model
    and a slot. The task that called ``acquire`` owns the lease. Unloading the model in
    mode ``cancel`` revokes the lease, which cancels that task; where the owner catches
    the cancellation, ``take_revocation`` turns it into ``ModelUnloaded`` (``async with``
    does so by itself when the cancellation passes through it).
    """

    def __init__(self, manager: ModelManager, model: str, task: Task, keep_alive: float | None) -> None:
        self.manager = manager
        self.model = model
        self.task = task
        self.keep_alive = keep_alive
        """Seconds the model stays loaded after this request (Ollama's ``keep_alive``); None: unchanged."""
        try:
            self.owner: asyncio.Task[Any] | None = asyncio.current_task()
        except RuntimeError:
            self.owner = None
        self.entry: LoadedModel | None = None
        self.running = False
        self.revoked = False
        self._reported = False

    async def __aenter__(self) -> Backend:
        return await self.manager._enter(self)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        await self.manager._exit(self)
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            error = self.take_revocation()
            if error is not None:
                raise error from None

    def adopt(self) -> None:
        """Make the current task the owner: a response streamed from another task than the
        handler's (Litestar streams from a child task) is what an unload must cancel."""
        self.owner = asyncio.current_task()

    def revoke(self) -> bool:
        """Cancel the owner's work on the model; True if this call cancelled a running task."""
        if self.revoked:
            return False
        self.revoked = True
        if self.owner is None or self.owner.done():
            return False
        self.owner.cancel()
        return True

    def take_revocation(self) -> ModelUnloaded | None:
        """In the owner, after catching ``CancelledError``: the error for the client if the
        cancellation was this lease's revocation (withdrawn, so the owner can answer), else None."""
        if not self.revoked or self._reported or asyncio.current_task() is not self.owner:
            return None
        self._reported = True
        if self.owner is not None:
            self.owner.uncancel()
        return ModelUnloaded(f"model {self.model!r} was unloaded while this request was using it; try again")


class ModelManager:
    def __init__(
        self,
        store: ModelStore,
        registry: BackendRegistry,
        device: Device,
        config: ServerConfig,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.registry = registry
        self.device = device
        self.config = config
        self.metrics = metrics or Metrics()
        self.metrics.registry.register(BackendCollector(self.loaded))
        self.engine = create_engine(registry.plugins, config, device)
        """Where backends run (``--engine``); None: in this process."""
        self._models: dict[tuple[str, str], LoadedModel] = {}
        # The backend chosen for a (task, model), kept while the store hands back the same
        # manifest object (it re-reads a manifest only when the file changed): choosing
        # asks every backend's supports(), which may look at the disk, on every request.
        self._chosen: dict[tuple[Task, str], tuple[Manifest, type[Backend]]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        budget = config.memory_budget
        if budget is None:
            budget = int(device.memory_bytes * 0.7) if device.memory_bytes else 8 << 30
        self.memory_budget = budget

    # --- resolution ------------------------------------------------------------------

    def find(self, model: str) -> Manifest:
        """The manifest a client's ``model`` string names: a model in the store, else an
        alias (``--alias NAME=MODEL``), else the catch-all alias ``*``. Unknown without an
        alias: ModelNotFound listing the models this server has."""
        try:
            return self.store.get(model)
        except ModelNotFound:
            aliases = dict(self.config.aliases)
            target = aliases.get(model.strip()) or aliases.get(CATCH_ALL_ALIAS)
            if target is not None:
                return self.store.get(target)
            names = [m.name for m in self.store.list()]
            shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (", ..." if len(names) > MAX_NAMES_SHOWN else "")
            name = split_quant(model.strip())[0] or "NAME"
            raise ModelNotFound(
                f"model {model!r} is not served here; this server has: {shown or 'no models'}. "
                f"Pull it with `nexa pull {name}`, or serve a local model under that name with "
                f"`nexa serve --alias {name}=MODEL`",
                param="model",
            ) from None

    def resolve(self, model: str, task: Task) -> tuple[Manifest, type[Backend]]:
        manifest = self.find(model)
        if task not in manifest.tasks:
            have = ", ".join(sorted(t.value for t in manifest.tasks)) or "none"
            raise UnsupportedTask(
                f"model {manifest.name!r} is not {_TASK_WORDS[task]} (it serves: {have})",
                param="model",
            )
        chosen = self._chosen.get((task, manifest.name))
        if chosen is not None and chosen[0] is manifest:
            return chosen
        cls = self.registry.select(task, manifest, self.device)
        self._chosen[(task, manifest.name)] = (manifest, cls)
        return manifest, cls

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def resident(self, model: str) -> list[LoadedModel]:
        """The resident entries of ``model``: ModelNotFound when no such model exists,
        ModelNotLoaded when it exists but is not in memory."""
        entries = [e for e in self._models.values() if e.manifest.name == model]
        if entries:
            return entries
        name = self.find(model).name  # the store's spelling (case, quant tag), or an alias's model
        entries = [e for e in self._models.values() if e.manifest.name == name]
        if not entries:
            raise ModelNotLoaded(f"model {name!r} is not loaded", param="model")
        return entries

    def keep_alive_of(self, entry: LoadedModel) -> float:
        return self.config.keepalive if entry.keep_alive is None else entry.keep_alive

    def expires_in(self, entry: LoadedModel, now: float | None = None) -> float | None:
        """Seconds until keep-alive unloads ``entry``; None while it will not (pinned, in
        use, unloading, or kept forever)."""
        keep = self.keep_alive_of(entry)
        if entry.pinned or entry.busy or entry.unloading is not None or keep < 0:
            return None
        return max(0.0, entry.last_used + keep - (time.monotonic() if now is None else now))

    # --- leases ----------------------------------------------------------------------

    def acquire(self, model: str, task: Task, *, keep_alive: float | None = None) -> Lease:
        """A lease on ``model`` for ``task``: ``async with`` it for the loaded backend with
        one of its slots held for the duration of the block."""
        return Lease(self, model, task, keep_alive)

    async def _enter(self, lease: Lease) -> Backend:
        while True:
            manifest, cls = self.resolve(lease.model, lease.task)
            key = (manifest.name, cls.name)
            entry = self._models.get(key)
            if entry is None or entry.unloading is None:
                break
            await entry.gone.wait()  # unloading on request: load it anew afterwards
        if entry is None:
            entry = self._start_load(key, manifest, cls, self._server_options(manifest, cls))
        if entry.waiting >= self.config.queue_size:
            raise Busy(
                f"model {manifest.name!r} has {entry.waiting} requests waiting; try again shortly",
                retry_after=max(1, entry.waiting // max(1, entry.backend.parallel)),
            )
        lease.entry = entry
        entry.leases.add(lease)
        entry.drained.clear()
        entry.waiting += 1
        self.metrics.queue_depth.labels(manifest.name).inc()
        try:
            await asyncio.shield(entry.ready)
            await entry.slots.acquire()
        except BaseException as exc:
            self._drop(lease)
            if isinstance(exc, asyncio.CancelledError):
                error = lease.take_revocation()
                if error is not None:
                    raise error from None
            raise
        finally:
            entry.waiting -= 1
            self.metrics.queue_depth.labels(manifest.name).dec()
        entry.active += 1
        lease.running = True
        self.metrics.active.labels(manifest.name).inc()
        return entry.backend

    async def _exit(self, lease: Lease) -> None:
        entry = lease.entry
        if entry is None or not lease.running:
            return
        lease.running = False
        entry.active -= 1
        self.metrics.active.labels(entry.manifest.name).dec()
        entry.last_used = time.monotonic()
        if lease.keep_alive is not None:
            entry.keep_alive = lease.keep_alive
        entry.slots.release()
        self._drop(lease)
        self._changed.set()
        if self.expires_in(entry) == 0.0:
            await self._unload(entry, "keepalive")

    def _drop(self, lease: Lease) -> None:
        entry = lease.entry
        if entry is None:
            return
        entry.leases.discard(lease)
        if not entry.leases:
            entry.drained.set()

    # --- loading ---------------------------------------------------------------------

    def _server_options(self, manifest: Manifest, cls: type[Backend]) -> LoadOptions:
        return LoadOptions(
            context_length=self.config.context_length,
            parallel=self.config.parallel,
            threads=self.config.threads,
            **self._optional_settings(manifest, cls),
        )

    def _start_load(
        self, key: tuple[str, str], manifest: Manifest, cls: type[Backend], options: LoadOptions
    ) -> LoadedModel:
        if self.engine is None:
            backend = cls(manifest, self.device, options)
        else:
            backend = self.engine.backend(cls, manifest, self.device, options)
        loop = asyncio.get_running_loop()
        entry = LoadedModel(
            key=key,
            manifest=manifest,
            backend=backend,
            options=options,
            ready=loop.create_future(),
            slots=asyncio.Semaphore(max(1, backend.parallel)),
        )
        self._models[key] = entry
        loop.create_task(self._load(entry), name=f"load {manifest.name}")
        return entry

    def _optional_settings(self, manifest: Manifest, cls: type[Backend]) -> dict[str, object]:
        """``--draft`` and ``--cache-type-k/-v`` for a backend that honours them; a warning
        (not a silent drop) for one that does not."""
        wanted = {
            "draft": self._draft_for(manifest),
            "cache_type_k": self.config.cache_type_k,
            "cache_type_v": self.config.cache_type_v,
        }
        given = {k: v for k, v in wanted.items() if v is not None}
        ignored = sorted(set(given) - cls.load_settings)
        if ignored:
            log.warning("%s runs on %s, which has no %s: the setting does not apply to it",
                        manifest.name, cls.name, ", ".join("--" + k.replace("_", "-") for k in ignored))
        return {k: v for k, v in given.items() if k in cls.load_settings}

    def _draft_for(self, manifest: Manifest) -> Manifest | str | None:
        """``--draft``: a draft model pairs with the model named at start (its vocabulary
        is that model's); lookup/off apply to every model."""
        draft = self.config.draft
        if draft is None or draft in DRAFT_WORDS:
            return draft
        return self.store.get(draft) if manifest.name == self.config.default_model else None

    async def _load(self, entry: LoadedModel) -> None:
        name = entry.manifest.name
        try:
            await self._make_room(entry.manifest, exclude=entry.key)
            started = time.monotonic()
            log.info("loading %s with %s", name, entry.backend.name)
            await entry.backend.start()
        except BaseException as exc:
            if self._models.get(entry.key) is entry:
                del self._models[entry.key]
            entry.gone.set()
            self.metrics.load_failures.labels(name).inc()
            log.warning("loading %s failed: %s", name, exc, exc_info=not isinstance(exc, NexaError))
            with contextlib.suppress(Exception):
                await entry.backend.stop()
            if isinstance(exc, NexaError):
                error: BaseException = exc
            else:
                # The client learns which model and what kind of failure; paths and
                # tracebacks stay in the server log.
                error = ModelLoadError(
                    f"model {name!r} could not be loaded by {entry.backend.name}: "
                    f"{type(exc).__name__}; its files may be damaged or of an unsupported kind "
                    "(pull it again or see the server log)"
                )
            entry.ready.set_exception(error)
            entry.ready.exception()  # mark retrieved: waiters may all have gone
            return
        self.metrics.loads.labels(name, entry.backend.name).inc()
        self.metrics.resident.set(len(self._models))
        log.info("loaded %s in %.2fs", name, time.monotonic() - started)
        entry.last_used = time.monotonic()
        entry.ready.set_result(None)
        self._changed.set()

    async def _make_room(self, manifest: Manifest, exclude: tuple[str, str]) -> None:
        """Unload idle, unpinned models, least recently used first, until the new one fits."""
        while True:
            others = [e for k, e in self._models.items() if k != exclude and e.unloading is None]
            used = sum(e.manifest.size for e in others)
            over_memory = used + manifest.size > self.memory_budget
            over_count = len(others) + 1 > self.config.max_loaded
            if not (over_memory or over_count):
                return
            idle = sorted((e for e in others if not e.busy and not e.pinned), key=lambda e: e.last_used)
            if not idle:
                log.warning(
                    "loading %s exceeds the memory budget, but every resident model is in use or pinned",
                    manifest.name,
                )
                return
            await self._unload(idle[0], "memory" if over_memory else "count")

    async def _unload(self, entry: LoadedModel, reason: str) -> None:
        if self._models.get(entry.key) is not entry:
            return
        del self._models[entry.key]
        log.info("unloading %s (%s)", entry.manifest.name, reason)
        self.metrics.evictions.labels(entry.manifest.name, reason).inc()
        self.metrics.resident.set(len(self._models))
        try:
            await entry.backend.stop()
        except Exception:
            log.exception("unloading %s failed", entry.manifest.name)
        finally:
            entry.gone.set()
            self._changed.set()

    # --- by hand (the management API) ------------------------------------------------

    async def load(
        self,
        model: str,
        *,
        context_length: int | None = None,
        parallel: int | None = None,
        keep_alive: float | None = None,
    ) -> LoadedModel:
        """Load ``model`` now (for the first task it serves of ``LOAD_ORDER``), with its own
        context and parallelism when given; a model already resident with other settings
        is a ``Conflict``."""
        manifest = self.find(model)
        task = next((t for t in LOAD_ORDER if t in manifest.tasks), None)
        if task is None:
            raise UnsupportedTask(f"model {manifest.name!r} declares no task to load it for", param="model")
        manifest, cls = self.resolve(manifest.name, task)
        if context_length is not None and not cls.honours_context_length:
            raise BadRequest(
                f"the {cls.name} backend of model {manifest.name!r} takes no context length", param="context"
            )
        key = (manifest.name, cls.name)
        entry = self._models.get(key)
        while entry is not None and entry.unloading is not None:
            await entry.gone.wait()
            entry = self._models.get(key)
        fresh = entry is None
        if entry is None:
            base = self._server_options(manifest, cls)
            options = attrs.evolve(
                base,
                context_length=context_length or base.context_length,
                parallel=parallel or base.parallel,
            )
            entry = self._start_load(key, manifest, cls, options)
        await asyncio.shield(entry.ready)
        info = entry.backend.resident_info()
        for param, asked, held in (("context", context_length, entry.options.context_length or info.context),
                                   ("parallel", parallel, entry.options.parallel or entry.backend.parallel)):
            if asked is not None and not fresh and asked != held:
                raise Conflict(
                    f"model {manifest.name!r} is loaded with {param} {held}; unload it first to load it "
                    f"with {param} {asked}",
                    param=param,
                )
        if parallel is not None and fresh and entry.backend.parallel != parallel:
            await self._unload(entry, "refused")
            raise BadRequest(
                f"the {cls.name} backend runs {entry.backend.parallel} request(s) at once for model "
                f"{manifest.name!r}, not {parallel}",
                param="parallel",
            )
        if keep_alive is not None:
            entry.keep_alive = keep_alive
            entry.last_used = time.monotonic()
        self._changed.set()
        return entry

    async def unload(self, model: str, mode: UnloadMode = "wait") -> tuple[list[LoadedModel], int]:
        """Unload every resident entry of ``model`` once its requests are done (``wait``) or
        cancelled (``cancel``); returns the entries and how many requests were cancelled."""
        entries = self.resident(model)
        cancelled = 0
        for entry in entries:
            if mode == "cancel":
                cancelled += sum(lease.revoke() for lease in list(entry.leases))
            if entry.unloading is None:
                entry.unloading = asyncio.get_running_loop().create_task(
                    self._unload_when_drained(entry), name=f"unload {entry.manifest.name}"
                )
                self._changed.set()
        for entry in entries:
            # Shielded: the unload goes on if the caller leaves (its model is marked).
            assert entry.unloading is not None
            await asyncio.shield(entry.unloading)
        return entries, cancelled

    async def _unload_when_drained(self, entry: LoadedModel) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(entry.ready)  # a load under way finishes first
        await entry.drained.wait()
        await self._unload(entry, "request")

    def pin(self, model: str, pinned: bool) -> list[LoadedModel]:
        """Exempt ``model`` from LRU eviction and keep-alive unloads (or end that)."""
        entries = self.resident(model)
        for entry in entries:
            entry.pinned = pinned
            entry.last_used = time.monotonic()
        self._changed.set()
        return entries

    # --- lifecycle -------------------------------------------------------------------

    async def preload(self, model: str) -> None:
        """Load a model now (``nexa serve MODEL``) for whichever task it serves first."""
        await self.load(model)

    async def start(self) -> None:
        if self.engine is not None:
            await self.engine.start()
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="keepalive")

    async def _reap(self) -> None:
        """Unload idle models whose keep-alive ran out, sleeping until the next is due or
        something changes (a request ends, a load, a pin, a keep-alive set)."""
        while True:
            self._changed.clear()
            now = time.monotonic()
            due = [e for e in self._models.values() if self.expires_in(e, now) == 0.0]
            for entry in due:
                await self._unload(entry, "keepalive")
            if due:
                continue
            waits = [w for e in self._models.values() if (w := self.expires_in(e, now)) is not None]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(waits) if waits else None)

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self.engine is not None:
            self.engine.detach()
        for entry in list(self._models.values()):
            await self._unload(entry, "shutdown")
        if self.engine is not None:
            await self.engine.stop()
