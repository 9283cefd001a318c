"""Wire schemas of the service itself: model cards and lists, health, the error
body, and the management API (``/v1/admin``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from nexa.server.schemas.common import KeepAlive, ModelName
from nexa.store import TAG_PART

# --- models, health, errors ---------------------------------------------------------


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    format: str
    tasks: list[str]
    size: int
    quant: str | None = None
    loaded: bool = False
    context_length: int | None = None
    """When loaded, by a backend with a fixed context: tokens one request's prompt and answer share."""
    context_reason: str | None = None
    """...and why that many (trained length, ``--ctx``, the KV cache's memory)."""
    runtime: dict[str, Any] | None = None
    """When loaded: what the model runs with (threads, KV cache size and types...)."""


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok"]
    version: str
    device: str
    models_loaded: list[str]


class PluginFailureWire(msgspec.Struct, kw_only=True):
    plugin: str
    stage: str
    error: str


class BackendWire(msgspec.Struct, kw_only=True):
    name: str
    plugin: str
    tasks: list[str]
    formats: list[str]
    devices: list[str]
    parallel: int
    priority: int


class PluginsReport(msgspec.Struct, kw_only=True):
    loaded: list[str]
    failed: list[PluginFailureWire]
    disabled: list[str]
    backends: list[BackendWire]


# --- management (/v1/admin) ----------------------------------------------------------
# Request bodies refuse unknown fields: a management call that silently ignored a
# misspelt setting would load or unload something else than asked.


class ResidentModel(msgspec.Struct, kw_only=True):
    model: str
    backend: str
    device: str
    state: Literal["loading", "ready", "unloading"]
    weights_bytes: int
    kv_cache_bytes: int | None = None
    context: int | None = None
    slots_busy: int
    slots_total: int
    queued: int
    keep_alive: float | None = None
    """Seconds the model stays loaded when idle; null: for good."""
    expires_in: float | None = None
    """Seconds until keep-alive unloads it; null while it will not (pinned, in use, kept for good)."""
    pinned: bool


class ResidentList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ResidentModel]


class LoadModelRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: ModelName
    context: Annotated[int, Meta(ge=16, le=1 << 20)] | None = None
    parallel: Annotated[int, Meta(ge=1, le=256)] | None = None
    keep_alive: KeepAlive | None = None


class UnloadModelRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: ModelName
    mode: Literal["wait", "cancel"] = "wait"
    """``wait``: let in-flight requests finish; ``cancel``: stop them (their clients get an error)."""


class UnloadResult(msgspec.Struct, kw_only=True):
    model: str
    unloaded: bool
    cancelled: int
    """Requests cancelled (mode ``cancel``)."""


class PinModelRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: ModelName
    pinned: bool = True


# A repo id the Hub takes (huggingface_hub's ``validate_repo_id``: each part starts and
# ends with a letter, digit or "_", at most 96 characters, no "--", no "..", no ".git" at
# the end), ASCII only as the store names it, then an optional ``:QUANT``. Refused here,
# with the field named, rather than by the pull; ``$(?!\n)`` as in ``MODEL_NAME_RE``.
HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
PULL_RE = rf"^(?!.*\.\.)(?![^:]*--)(?![^:]*\.git(?::|$)){HUB_PART}(?:/{HUB_PART})?(?::{TAG_PART})?$(?!\n)"


class PullRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1, max_length=300, pattern=PULL_RE)]
    """``ORG/REPO`` or ``ORG/REPO:QUANT`` on the Hub."""
