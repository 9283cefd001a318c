"""What the server holds: ``/v1/models`` (the store, with what is loaded), ``/health``,
``/v1/plugins`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib

from litestar import Controller, Response, get
from litestar.params import FromPath
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import nexa
from nexa.manager import LoadedModel
from nexa.server import schemas as wire
from nexa.server.deps import Manager, MetricsDep, Plugins, Registry, Store
from nexa.server.errors import GUARDED, error_responses
from nexa.types import ContextPlan, Manifest, Task


def served_tasks(manifest: Manifest) -> list[str]:
    """The model's tasks, plus ``rerank`` for an embedding model (it ranks by cosine)."""
    tasks = set(manifest.tasks)
    if Task.EMBED in tasks:
        tasks.add(Task.RERANK)
    return sorted(t.value for t in tasks)


def model_card(manager: Manager, manifest: Manifest) -> wire.ModelCard:
    loaded = {e.manifest.name for e in manager.loaded()}
    plan = next((p for e in manager.loaded() if e.manifest.name == manifest.name and (p := _context_plan(e))), None)
    owner = manifest.name.split("/", 1)[0] if "/" in manifest.name else "local"
    created = 0
    if manifest.root is not None:
        with contextlib.suppress(OSError):
            created = int(manifest.root.stat().st_mtime)
    return wire.ModelCard(
        id=manifest.name,
        created=created,
        owned_by=owner,
        format=manifest.format,
        tasks=served_tasks(manifest),
        size=manifest.size,
        quant=manifest.quant,
        loaded=manifest.name in loaded,
        context_length=plan.length if plan else None,
        context_reason=plan.reason if plan else None,
    )


def _context_plan(entry: LoadedModel) -> ContextPlan | None:
    """A ready model's context plan (made at its load)."""
    ready = entry.ready
    if not ready.done() or ready.cancelled() or ready.exception() is not None:
        return None
    return entry.backend.context_plan()


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get(summary="List the models this server can serve", responses=error_responses(*GUARDED))
    async def list_models(self, model_store: Store, manager: Manager) -> wire.ModelList:
        manifests = await asyncio.to_thread(model_store.list)
        return wire.ModelList(data=[model_card(manager, m) for m in manifests])

    @get("/{model_id:path}", summary="Describe one model", responses=error_responses(400, 404, *GUARDED))
    async def get_model(self, model_id: FromPath[str], manager: Manager) -> wire.ModelCard:
        manifest = await asyncio.to_thread(manager.find, model_id.lstrip("/"))
        return model_card(manager, manifest)


@get("/health", tags=["server"], summary="Liveness and loaded models", responses=error_responses(403, 500))
async def health(manager: Manager) -> wire.Health:
    return wire.Health(
        status="ok",
        version=nexa.__version__,
        device=manager.device.kind,
        models_loaded=sorted({e.manifest.name for e in manager.loaded() if e.ready.done()}),
    )


@get("/v1/plugins", tags=["server"], summary="Installed plugins, failures and backends",
     responses=error_responses(*GUARDED))
async def plugins_report(plugins: Plugins, registry: Registry) -> wire.PluginsReport:
    return wire.PluginsReport(
        loaded=sorted(plugins.loaded),
        failed=[wire.PluginFailureWire(plugin=f.plugin, stage=f.stage, error=f.error) for f in plugins.failures],
        disabled=sorted(plugins.disabled),
        backends=[
            wire.BackendWire(
                name=b.name,
                plugin=b.plugin,
                tasks=sorted(t.value for t in b.tasks),
                formats=sorted(b.formats),
                devices=sorted(b.devices),
                parallel=b.parallel,
                priority=b.priority,
            )
            for b in registry.infos()
        ],
    )


@get("/metrics", tags=["server"], summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST,
     responses=error_responses(*GUARDED))
async def metrics_endpoint(metrics: MetricsDep) -> Response[bytes]:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
