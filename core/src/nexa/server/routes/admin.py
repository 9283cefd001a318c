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

import logging
import time

from litestar import Controller, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import JSONBody

from nexa.errors import BadRequest, Forbidden
from nexa.manager import LoadedModel, ModelManager
from nexa.server import convert
from nexa.server import schemas as wire
from nexa.server.deps import Manager
from nexa.server.errors import GUARDED, error_responses
from nexa.server.security import bind_is_loopback
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
        keep_alive = convert.keep_alive_seconds(data.keep_alive)
        if keep_alive == 0:
            raise BadRequest(
                "keep_alive 0 would unload the model as soon as it loaded; unload with /v1/admin/models/unload",
                param="keep_alive",
            )
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
