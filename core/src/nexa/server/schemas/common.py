"""Constrained types and OpenAPI helpers that every wire schema shares (model names,
sampling ranges, keep-alive durations, documented caps)."""

from __future__ import annotations

from typing import Annotated

from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import KwargDefinition
from msgspec import Meta

from nexa.config import ServerConfig

# The server's default caps are part of the document (and enforced at decoding), so a
# client or fuzzer reading it knows the limits; a ServerConfig may only lower them
# (checked in ``convert``).
_CAPS = ServerConfig()



class _SchemaExtra(dict):
    """Extra OpenAPI keywords; hashable so Litestar accepts it inside a union member."""

    __hash__ = object.__hash__  # type: ignore[assignment]


# Litestar leaves out a constraint whose value is 0 (it tests the value for truth), so a
# documented ``ge=0`` has to be stated again; without it the document allows negatives.
MIN0 = KwargDefinition(schema_extra=_SchemaExtra(minimum=0))
ABOVE0 = KwargDefinition(schema_extra=_SchemaExtra(exclusive_minimum=0))
# Litestar also leaves out the constraints of a list in a union of three or more.
MAX16 = KwargDefinition(schema_extra=_SchemaExtra(max_items=16))


def documented_max_items(cap: int) -> Meta:
    """``maxItems`` in the document only: the server enforces the configured cap itself
    (``nexa.server.limits``), which ``nexa serve --limit`` may raise above the default."""
    return Meta(extra_json_schema={"extra": _SchemaExtra(max_items=cap)})


def documented_max_bytes(cap: int) -> KwargDefinition:
    """``maxProperties`` can't state a size in bytes; say it in the field's description."""
    return KwargDefinition(description=f"A JSON schema of at most {cap} bytes (the server's default cap)")

Float01 = Annotated[float, Meta(ge=0.0, le=1.0), MIN0]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
# No upper bound: agents ask for 32k-128k; the backend caps it at the room the context
# leaves (finish reason ``length``) instead of refusing.
MaxTokens = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0), MIN0]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# Seconds as a string, or a Go-style duration ("5m", "1h30m", "-1s"), as Ollama takes.
DURATION_RE = rf"^[+-]?(?:{_NUMBER}|(?:{_NUMBER}(?:ns|us|µs|μs|ms|s|m|h))+)$"
_KEEP_ALIVE_TEXT = (
    "nexa extension (Ollama's field): how long the model stays loaded after this request, "
    "in seconds or as a duration (\"5m\", \"1h\"); 0 unloads it after the request, "
    "a negative value keeps it loaded"
)
# Litestar drops a string's constraints inside a union: the document states both shapes.
_KEEP_ALIVE_SCHEMA = KwargDefinition(
    schema_extra=_SchemaExtra(
        one_of=[
            Schema(type=OpenAPIType.NUMBER),
            Schema(type=OpenAPIType.STRING, max_length=64, pattern=DURATION_RE),
        ],
        type=None,
    ),
)
KeepAlive = Annotated[
    float | Annotated[str, Meta(max_length=64, pattern=DURATION_RE)],
    _KEEP_ALIVE_SCHEMA,
    Meta(description=_KEEP_ALIVE_TEXT),
]
# A model name is looked up in the store and echoed back: no control characters (C0, DEL,
# C1), and no space at either end (``"name\n"`` is refused, not quietly served as
# ``name``). Explicit ranges, not ``\s``: Python's and ECMAScript's differ (U+0085); and
# ``$(?!\n)``: Python's ``$`` also matches before a final newline, ECMAScript's doesn't.
MODEL_NAME_RE = r"^[^\x00-\x20\x7f-\x9f](?:[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f])?$(?!\n)"
ModelName = Annotated[str, Meta(min_length=1, max_length=256, pattern=MODEL_NAME_RE)]
ShortText = Annotated[str, Meta(max_length=256)]
"""Names and ids (a message's ``name``, tool call ids, ``user``)."""
StopText = Annotated[str, Meta(max_length=256), KwargDefinition(max_length=256)]


