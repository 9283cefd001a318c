"""Model management: ``GET /v1/admin/models`` (what is resident and what it holds),
``POST /v1/admin/models/load|unload|pin``, and ``POST /v1/admin/pull`` (a download into
the store, its progress streamed as server-sent events).

Model ids contain ``/`` and ``GET /v1/models/{id}`` takes the rest of its path, so
management has its own prefix and names the model in a JSON body (llama.cpp's router and
Ollama's ``/api/ps`` are the habits followed). When the server has an API key, the app's
guard already demands it here as everywhere; a server bound to a non-loopback address
without a key refuses management outright (``--insecure`` opens inference, not this).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from litestar import Controller, Request, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import JSONBody

from nexa.backend import CancelToken
from nexa.errors import Cancelled, Forbidden, NexaError
from nexa.manager import LoadedModel, ModelManager
from nexa.metrics import Metrics
from nexa.server import convert
from nexa.server import schemas as wire
from nexa.server.deps import Manager, MetricsDep, Store
from nexa.server.errors import GUARDED, error_payload, error_responses
from nexa.server.openapi import EventStreamOperation
from nexa.server.security import bind_is_loopback
from nexa.server.work import SSE_DONE, SSE_HEADERS, EventStream, sse, until_disconnected
from nexa.store import ModelStore
from nexa.types import ResidentInfo

log = logging.getLogger("nexa.server")


def management_allowed(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    config = connection.app.state.config
    if not config.api_key and not bind_is_loopback(config.host):
        raise Forbidden(
            f"model management is refused on a server bound to {config.host} without an API key: "
            "anyone on the network could load, unload or pull models (start it with --api-key)"
        )


def resident_info(entry: LoadedModel) -> ResidentInfo:
    """The backend's own figures, or the manifest's while it loads or if it fails to say."""
    base = ResidentInfo(
        device=entry.backend.device.kind,
        weights_bytes=entry.manifest.size,
        context=entry.manifest.context_length,
    )
    if entry.state == "loading":
        return base
    try:
        return entry.backend.resident_info()
    except Exception:
        log.warning("%s could not describe %s", entry.backend.name, entry.manifest.name, exc_info=True)
        return base


def resident_wire(manager: ModelManager, entry: LoadedModel, now: float | None = None) -> wire.ResidentModel:
    info = resident_info(entry)
    keep = manager.keep_alive_of(entry)
    return wire.ResidentModel(
        model=entry.manifest.name,
        backend=entry.backend.name,
        device=info.device,
        state=entry.state,  # type: ignore[arg-type]
        weights_bytes=info.weights_bytes,
        kv_cache_bytes=info.kv_cache_bytes,
        context=info.context,
        slots_busy=entry.active,
        slots_total=entry.backend.parallel,
        queued=entry.waiting,
        keep_alive=None if keep < 0 else keep,
        expires_in=manager.expires_in(entry, now),
        pinned=entry.pinned,
    )


ADMIN_ERRORS = (400, 404, 409, 500, 503, *GUARDED)


class PullRun:
    """One pull (``nexa.hub.pull``) on a worker thread, its progress events (``PullProgress``)
    handed to the event loop; cancelling its token stops it between chunks, installing nothing."""

    def __init__(self, store: ModelStore, spec: str, metrics: Metrics) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel = CancelToken()
        self.metrics = metrics
        self.finished = self.loop.run_in_executor(None, self._work, store, spec)

    def _put(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def _work(self, store: ModelStore, spec: str) -> None:
        from nexa.hub import pull

        try:
            manifest = pull(store, spec, on_progress=lambda event: self._put("progress", event), cancel=self.cancel)
        except Cancelled:
            self.metrics.pulls.labels("cancelled").inc()
            self._put("cancelled", None)
        except BaseException as exc:
            self.metrics.pulls.labels("failed").inc()
            self._put("error", exc)
        else:
            self.metrics.pulls.labels("done").inc()
            self._put("done", manifest)

    async def first(self, request: Request) -> tuple[str, Any]:
        """The first event; the pull's error if it failed before any (an HTTP error then)."""
        try:
            kind, value = await until_disconnected(request, self.queue.get())
        except BaseException:
            await self.stop()
            raise
        if kind == "error":
            raise value
        return kind, value

    async def stop(self) -> None:
        """Cancel the pull (a no-op once it ended) and wait until its thread has stopped."""
        self.cancel.cancel()
        with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
            await self.finished

    async def frames(self, first: tuple[str, Any]) -> AsyncIterator[bytes]:
        try:
            kind, value = first
            while kind == "progress":
                yield sse(value.to_dict())
                kind, value = await self.queue.get()
            if kind == "error":
                # Headers are gone already: the error travels as an event, as chat's do.
                if not isinstance(value, NexaError):
                    log.error("pull failed", exc_info=value)
                    value = NexaError(f"internal error ({type(value).__name__})")
                yield sse(error_payload(value))
            yield SSE_DONE
        finally:
            await self.stop()  # the client left: the pull stops, nothing is installed


class AdminController(Controller):
    path = "/v1/admin"
    tags = ["management"]
    guards = [management_allowed]

    @get("/models", summary="Models resident in memory: what each holds, its slots, queue and keep-alive",
         responses=error_responses(*GUARDED))
    async def resident(self, manager: Manager) -> wire.ResidentList:
        now = time.monotonic()
        entries = sorted(manager.loaded(), key=lambda e: e.manifest.name)
        return wire.ResidentList(data=[resident_wire(manager, e, now) for e in entries])

    @post("/models/load", status_code=200, summary="Load a model now (optionally with context, parallel, keep_alive)",
          responses=error_responses(*ADMIN_ERRORS))
    async def load(self, data: JSONBody[wire.LoadModelRequest], manager: Manager) -> wire.ResidentModel:
        # keep_alive 0 is honoured as Ollama does: the model unloads as soon as it is idle.
        keep_alive = convert.keep_alive_seconds(data.keep_alive)
        entry = await manager.load(data.model, context_length=data.context, parallel=data.parallel,
                                   keep_alive=keep_alive)
        return resident_wire(manager, entry)

    @post("/models/unload", status_code=200,
          summary="Unload a model once its requests finish (mode wait) or after cancelling them (mode cancel)",
          responses=error_responses(*ADMIN_ERRORS))
    async def unload(self, data: JSONBody[wire.UnloadModelRequest], manager: Manager) -> wire.UnloadResult:
        entries, cancelled = await manager.unload(data.model, data.mode)
        return wire.UnloadResult(model=entries[0].manifest.name, unloaded=True, cancelled=cancelled)

    @post("/models/pin", status_code=200, summary="Pin a resident model (never evicted nor unloaded by keep-alive)",
          responses=error_responses(*ADMIN_ERRORS))
    async def pin(self, data: JSONBody[wire.PinModelRequest], manager: Manager) -> wire.ResidentModel:
        entries = manager.pin(data.model, data.pinned)
        return resident_wire(manager, entries[0])

    @post("/pull", status_code=200, responses=error_responses(400, 404, 500, *GUARDED),
          operation_class=EventStreamOperation,
          summary="Pull ORG/REPO[:QUANT] from the Hub into the store, progress as server-sent events",
          description=(
              "Each event's data is one `nexa.progress.PullProgress` as JSON (stage, file, bytes done and "
              "total, speed, ETA; the last has stage `done` and the model's name), then `[DONE]`. "
              "Closing the connection cancels the pull: nothing is installed, and its partial files are "
              "resumed by the next pull. An error before the first event is an HTTP error; after, an "
              "error event."
          ))
    async def pull(
        self, data: JSONBody[wire.PullRequest], request: Request, model_store: Store, metrics: MetricsDep
    ) -> EventStream:
        run = PullRun(model_store, data.model, metrics)
        first = await run.first(request)
        return EventStream(run.frames(first), headers=SSE_HEADERS)
