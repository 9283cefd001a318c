"""The HTTP routes, one module per endpoint family. ``ROUTES`` is what the app serves."""

from __future__ import annotations

from nexa.server.routes.admin import AdminController
from nexa.server.routes.audio import AudioController
from nexa.server.routes.chat import ChatController
from nexa.server.routes.completions import CompletionsController
from nexa.server.routes.embeddings import EmbeddingsController
from nexa.server.routes.images import ImagesController
from nexa.server.routes.messages import MessagesController
from nexa.server.routes.models import ModelsController, health, metrics_endpoint, plugins_report
from nexa.server.routes.page import page_asset, page_index
from nexa.server.routes.rerank import rerank
from nexa.server.routes.responses import ResponsesController

ROUTES = [
    ChatController,
    CompletionsController,
    EmbeddingsController,
    ImagesController,
    MessagesController,
    ResponsesController,
    rerank,
    AudioController,
    ModelsController,
    AdminController,
    page_index,
    page_asset,
    health,
    plugins_report,
    metrics_endpoint,
]

__all__ = ["ROUTES"]
