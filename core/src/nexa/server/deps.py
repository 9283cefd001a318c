"""The server's resources as handler parameters (Litestar dependency injection).

A handler names what it needs (``manager: Manager``) and ``create_app`` provides it.
Validation is skipped: these are the app's own objects, and converting them per request
would cost time on every call (and copy attrs classes).
"""

from __future__ import annotations

from litestar.params import SkipValidation

from nexa.config import ServerConfig
from nexa.manager import ModelManager
from nexa.metrics import Metrics
from nexa.plugins import PluginSet
from nexa.registry import BackendRegistry
from nexa.server.images import ImageFiles
from nexa.server.responses_store import ResponseStore
from nexa.store import ModelStore

Config = SkipValidation[ServerConfig]
Manager = SkipValidation[ModelManager]
Store = SkipValidation[ModelStore]
MetricsDep = SkipValidation[Metrics]
Plugins = SkipValidation[PluginSet]
Registry = SkipValidation[BackendRegistry]
Images = SkipValidation[ImageFiles]
Responses = SkipValidation[ResponseStore]
