"""Loaded models: single-flight loading, per-model slots and queues, keepalive, LRU eviction.

The ``ModelManager`` turns a client's ``model`` string and a task into a loaded backend
instance. Concurrent requests for an unloaded model cause exactly one load; each model
runs ``backend.parallel`` requests at once and lets at most ``queue_size`` more wait
(the rest get 503 with Retry-After). Idle models unload after ``keepalive`` seconds, and
loading a model that would exceed the memory budget evicts least-recently-used idle
models first; a model in use is never evicted. With an engine (``--engine``, see
``nexa.engine``) the backend instance is the engine's stand-in for the model, and all of
the above applies to it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import attrs

from nexa.backend import Backend, LoadOptions
from nexa.config import CATCH_ALL_ALIAS, DRAFT_WORDS, ServerConfig
from nexa.engine import create_engine
from nexa.errors import Busy, ModelLoadError, ModelNotFound, NexaError, UnsupportedTask
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


@attrs.define(eq=False)
class LoadedModel:
    """One model resident in memory, served by one backend instance."""

    manifest: Manifest
    backend: Backend
    ready: asyncio.Future[None]
    slots: asyncio.Semaphore
    active: int = 0
    waiting: int = 0
    last_used: float = attrs.field(factory=time.monotonic)

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0 or not self.ready.done()


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

    # --- acquiring a slot ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(self, model: str, task: Task) -> AsyncIterator[Backend]:
        """A loaded backend with one of its slots held for the duration of the block."""
        manifest, cls = self.resolve(model, task)
        key = (manifest.name, cls.name)
        entry = self._models.get(key)
        if entry is None:
            entry = self._start_load(key, manifest, cls)
        if entry.waiting >= self.config.queue_size:
            raise Busy(
                f"model {manifest.name!r} has {entry.waiting} requests waiting; try again shortly",
                retry_after=max(1, entry.waiting // max(1, entry.backend.parallel)),
            )
        entry.waiting += 1
        self.metrics.queue_depth.labels(manifest.name).inc()
        try:
            await asyncio.shield(entry.ready)
            await entry.slots.acquire()
        finally:
            entry.waiting -= 1
            self.metrics.queue_depth.labels(manifest.name).dec()
        entry.active += 1
        self.metrics.active.labels(manifest.name).inc()
        try:
            yield entry.backend
        finally:
            entry.active -= 1
            self.metrics.active.labels(manifest.name).dec()
            entry.last_used = time.monotonic()
            entry.slots.release()
            if self.config.keepalive == 0 and not entry.busy:
                await self._unload(key, "keepalive")

    def _start_load(self, key: tuple[str, str], manifest: Manifest, cls: type[Backend]) -> LoadedModel:
        options = LoadOptions(
            context_length=self.config.context_length,
            parallel=self.config.parallel,
            threads=self.config.threads,
            **self._optional_settings(manifest, cls),
        )
        if self.engine is None:
            backend = cls(manifest, self.device, options)
        else:
            backend = self.engine.backend(cls, manifest, self.device, options)
        loop = asyncio.get_running_loop()
        entry = LoadedModel(
            manifest=manifest,
            backend=backend,
            ready=loop.create_future(),
            slots=asyncio.Semaphore(max(1, backend.parallel)),
        )
        self._models[key] = entry
        loop.create_task(self._load(key, entry), name=f"load {manifest.name}")
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

    async def _load(self, key: tuple[str, str], entry: LoadedModel) -> None:
        name = entry.manifest.name
        try:
            await self._make_room(entry.manifest, exclude=key)
            started = time.monotonic()
            log.info("loading %s with %s", name, entry.backend.name)
            await entry.backend.start()
        except BaseException as exc:
            self._models.pop(key, None)
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

    async def _make_room(self, manifest: Manifest, exclude: tuple[str, str]) -> None:
        """Unload idle models, least recently used first, until the new one fits."""
        def resident() -> list[tuple[tuple[str, str], LoadedModel]]:
            return [(k, e) for k, e in self._models.items() if k != exclude]

        while True:
            others = resident()
            used = sum(e.manifest.size for _, e in others)
            over_memory = used + manifest.size > self.memory_budget
            over_count = len(others) + 1 > self.config.max_loaded
            if not (over_memory or over_count):
                return
            idle = sorted((e.last_used, k) for k, e in others if not e.busy)
            if not idle:
                log.warning(
                    "loading %s exceeds the memory budget, but every resident model is in use",
                    manifest.name,
                )
                return
            await self._unload(idle[0][1], "memory" if over_memory else "count")

    async def _unload(self, key: tuple[str, str], reason: str) -> None:
        entry = self._models.pop(key, None)
        if entry is None:
            return
        log.info("unloading %s (%s)", entry.manifest.name, reason)
        self.metrics.evictions.labels(entry.manifest.name, reason).inc()
        self.metrics.resident.set(len(self._models))
        try:
            await entry.backend.stop()
        except Exception:
            log.exception("unloading %s failed", entry.manifest.name)

    # --- lifecycle -------------------------------------------------------------------

    async def preload(self, model: str) -> None:
        """Load a model now (``nexa serve MODEL``) for whichever task it serves first."""
        manifest = self.find(model)
        order = (Task.CHAT, Task.EMBED, Task.RERANK, Task.TRANSCRIBE, Task.IMAGE, Task.VLM)
        task = next(t for t in order if t in manifest.tasks)
        async with self.acquire(model, task):
            pass

    async def start(self) -> None:
        if self.engine is not None:
            await self.engine.start()
        if self.config.keepalive > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="keepalive")

    async def _reap(self) -> None:
        interval = min(5.0, max(0.05, self.config.keepalive / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for key, entry in list(self._models.items()):
                if not entry.busy and now - entry.last_used >= self.config.keepalive:
                    await self._unload(key, "keepalive")

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self.engine is not None:
            self.engine.detach()
        for key in list(self._models):
            await self._unload(key, "shutdown")
        if self.engine is not None:
            await self.engine.stop()
