"""The app factory: one Litestar app from a ``ServerConfig`` and the loaded plugins.

``create_app`` builds the server's resources (store, registry, model manager, metrics,
generated-image files), hands them to route handlers by dependency injection (a handler
names ``manager: ModelManager`` and gets it), starts and stops the manager in the app's
lifespan, and wires the guard (``security``), the strict body decoder (``body``), the
metrics middleware (``middleware``) and the error mapping (``errors``). The routes live in ``nexa.server.routes``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

import nexa
from nexa.config import ServerConfig
from nexa.device import detect_device
from nexa.manager import ModelManager
from nexa.metrics import Metrics
from nexa.plugins import PluginSet, load_plugins
from nexa.registry import BackendRegistry
from nexa.server.anthropic_errors import with_anthropic_shape
from nexa.server.body import NexaRequest
from nexa.server.errors import EXCEPTION_HANDLERS
from nexa.server.images import ImageFiles
from nexa.server.middleware import metrics_middleware
from nexa.server.openapi import ClosedBodies
from nexa.server.responses_store import ResponseStore
from nexa.server.routes import ROUTES
from nexa.server.security import bind_is_loopback, make_guard
from nexa.store import ModelStore

log = logging.getLogger("nexa.server")


def _provide(value: Any) -> Provide:
    def provider() -> Any:
        return value

    return Provide(provider, use_cache=True, sync_to_thread=False)


def create_app(
    config: ServerConfig | None = None,
    *,
    plugins: PluginSet | None = None,
    store: ModelStore | None = None,
) -> Litestar:
    """The nexa ASGI app. ``plugins`` defaults to every installed plugin."""
    config = config or ServerConfig()
    plugins = plugins if plugins is not None else load_plugins()
    for failure in plugins.failures:
        log.warning("plugin %s failed at %s: %s", failure.plugin, failure.stage, failure.error)
    if store is None:
        store = ModelStore(config.home) if config.home else ModelStore()
    store.packaged = list(plugins.models)
    device = detect_device(config.device)
    registry = BackendRegistry(plugins, pin=config.backend)
    metrics = Metrics()
    manager = ModelManager(store, registry, device, config, metrics)
    images = ImageFiles(store.home / "images", config.image_ttl, config.image_store_bytes)
    responses = ResponseStore(store.home / "responses.db", ttl=config.responses_ttl,
                              max_count=config.responses_max, api_key=config.api_key)
    resources: dict[str, Any] = {
        "config": config,
        # Not "store": Litestar reports a request-body field that fails validation as a
        # server error when its name is a dependency's, and the Responses API has a
        # ``store`` field.
        "model_store": store,
        "plugins": plugins,
        "registry": registry,
        "manager": manager,
        "metrics": metrics,
        "images": images,
        "responses": responses,
    }

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await manager.start()
        preload = None
        if config.default_model:
            async def load_default() -> None:
                try:
                    await manager.preload(config.default_model)
                except Exception as exc:
                    log.error("could not load %s: %s", config.default_model, exc)

            preload = asyncio.get_running_loop().create_task(load_default())
        try:
            yield
        finally:
            if preload is not None:
                preload.cancel()
            await manager.shutdown()
            await responses.close()

    cors = CORSConfig(allow_origins=list(config.origins), allow_headers=["*"]) if config.origins else None
    return Litestar(
        route_handlers=ROUTES,
        dependencies={name: _provide(value) for name, value in resources.items()},
        # Also on app.state, for tests and tools that inspect a running server.
        state=State(resources),
        lifespan=[lifespan],
        # A guard, not before_request: app guards add to those of routes, never replaced.
        guards=[make_guard(config)],
        request_class=NexaRequest,
        exception_handlers=with_anthropic_shape(EXCEPTION_HANDLERS),
        cors_config=cors,
        middleware=[metrics_middleware(metrics)],
        plugins=[ClosedBodies()],
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="nexa",
            version=nexa.__version__,
            description="A local server for AI models that speaks the OpenAI HTTP API.",
            path="/schema",
        ),
        debug=False,
    )


__all__ = ["create_app", "bind_is_loopback"]
