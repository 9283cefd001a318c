"""Server settings: one frozen value built by the CLI (or a test) and read everywhere else."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18181
CATCH_ALL_ALIAS = "*"


def _pairs(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(k), str(v)) for k, v in items)


@attrs.frozen
class ServerConfig:
    """Everything ``nexa serve`` can be told. Defaults are what a laptop user wants."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    home: Path | None = None
    """The store (``NEXA_HOME``); None: the default user cache dir."""
    device: str | None = None
    """Force ``cuda``/``metal``/``cpu``; None: detect."""
    backend: str | None = None
    """Pin every model to this backend name (``--backend``)."""
    engine: str | None = None
    """Where backends run (``--engine``): None or ``local`` in this process, else the name
    of an engine plugin (``ray``)."""
    engine_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    """Settings the chosen engine reads (``--replicas``, ``--ray-address``, ``--placement``);
    each engine documents and checks its own."""
    default_model: str | None = None
    """Model loaded at start-up (``nexa serve MODEL``)."""
    keepalive: float = 300.0
    """Seconds an idle model stays loaded; 0 unloads after each request, <0 never."""
    memory_budget: int | None = None
    """Bytes of model files that may be resident at once; None: 70% of device memory."""
    max_loaded: int = 4
    """At most this many models resident at once."""
    parallel: int | None = None
    """Requests each loaded model runs at once; None: the backend's own default."""
    context_length: int | None = None
    """Override every model's context length (``--ctx``)."""
    aliases: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    """(NAME, MODEL) pairs (``--alias NAME=MODEL``): a client's ``model`` NAME that is not in
    the store is served by MODEL; NAME ``*`` catches every unknown name. A dict works too."""
    responses_ttl: float = 30 * 24 * 3600.0
    """Seconds a stored ``/v1/responses`` answer is kept (``--responses-ttl``)."""
    responses_max: int = 10_000
    """Stored responses kept at most; the oldest go first (``--responses-max``)."""
    threads: int | None = None
    queue_size: int = 64
    """Requests that may wait per model; beyond that, 503 with Retry-After."""
    request_timeout: float = 600.0
    """Seconds one request may run before it is cancelled."""
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM."""
    api_key: str | None = None
    origins: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """CORS origins allowed; empty: CORS off."""
    allow_insecure_bind: bool = False
    """Allow a non-loopback bind without an API key."""
    media_dirs: tuple[Path, ...] = attrs.field(default=(), converter=tuple)
    """Folders local image paths may come from; empty: the working directory."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs (public addresses only)."""
    # --- caps on one request (docs/reliability.md has the table; `nexa serve --limit`) ---
    max_body_bytes: int = 32 * 1024 * 1024
    """Bytes of one request body (413 beyond)."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Bytes of one image, however it arrives (413 beyond)."""
    max_image_pixels: int = 40_000_000
    """Pixels of one image, read from its header before decoding (413 beyond)."""
    max_images_per_request: int = 8
    max_image_n: int = 4
    """Images one generation request may ask for (``n``)."""
    max_image_side: int = 2048
    """Pixels of each side of a generated image."""
    max_embed_batch: int = 512
    """Inputs in one embeddings request."""
    max_embed_input_chars: int = 100_000
    """Characters of one embeddings input (tokens, for a token array)."""
    max_embed_total_chars: int = 1_000_000
    """Characters over all inputs of one embeddings request (tokens, for token arrays),
    checked before anything is tokenized."""
    max_messages: int = 4096
    """Messages in one chat request, checked before any of them is looked at."""
    max_tools: int = 128
    """Tools in one chat request."""
    max_json_depth: int = 64
    """Nesting of a request body: objects and arrays inside each other."""
    max_schema_bytes: int = 64 * 1024
    """Bytes of one JSON schema (a ``response_format`` schema, one tool's ``parameters``)."""
    max_schema_depth: int = 32
    """Schemas nested inside one schema (properties, items, anyOf...)."""
    max_schema_repeat: int = 1000
    """The largest repetition a schema may ask for: ``minLength``/``maxLength``,
    ``minItems``/``maxItems``, ``minProperties``/``maxProperties`` and ``{m,n}`` in a
    ``pattern``. A grammar repeats a rule that many times; llama.cpp refuses more than
    about a thousand nested repetitions and crashes far beyond."""
    max_grammar_size: int = 50_000
    """The size of the grammars one request's schemas become, estimated before any is
    built: one per schema, plus every repetition count, enum value and pattern element."""
    max_rerank_documents: int = 1000
    """Documents one rerank request may carry."""
    max_rerank_chars: int = 100_000
    """Characters of the query and of each document in a rerank request."""
    max_audio_bytes: int = 25 * 1024 * 1024
    """Bytes of an uploaded audio file (OpenAI's limit); more is a 413."""
    max_audio_seconds: float = 1800.0
    """Seconds of decoded audio one transcription may hold; longer is a 413."""
    reasoning_format: str = attrs.field(
        default="separate", validator=attrs.validators.in_(("separate", "inline", "hidden")))
    """How a thinking model's reasoning is returned unless a request says otherwise:
    ``separate`` (``reasoning_content``), ``inline`` (left in ``content``), ``hidden``."""
    reasoning_budget: int = attrs.field(default=-1, validator=attrs.validators.ge(-1))
    """Thinking tokens a thinking model may spend before its thought is closed, unless a
    request says otherwise; -1: unlimited, 0: no thinking."""
    image_ttl: float = 3600.0
    """Seconds a generated image stays fetchable by URL."""
    image_store_bytes: int = 512 * 1024 * 1024


LIMITS = (
    "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images_per_request", "max_image_n",
    "max_image_side", "max_embed_batch", "max_embed_input_chars", "max_embed_total_chars",
    "max_messages", "max_tools", "max_json_depth", "max_schema_bytes", "max_schema_depth",
    "max_schema_repeat", "max_grammar_size",
)
"""The per-request caps (``ServerConfig`` fields) a user may set: ``nexa serve --limit NAME=VALUE``."""
LOWER_ONLY = ("max_image_n", "max_image_side", "max_embed_batch", "max_embed_input_chars")
"""Caps whose defaults are part of the wire schema (and so of the OpenAPI document): they
can be lowered, not raised."""
