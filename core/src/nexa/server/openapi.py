"""Corrections to the OpenAPI document Litestar generates, so ``/schema`` tells the truth."""

from __future__ import annotations

import dataclasses

from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Reference, Schema

# OpenAPI 3.1: the schema of an event stream describes one event.
EVENT = Schema(
    type=OpenAPIType.OBJECT,
    required=["data"],
    properties={"data": Schema(type=OpenAPIType.STRING)},
    description="Each event's data is one chunk (or an error) as JSON; the last is `[DONE]`",
)


@dataclasses.dataclass
class EventStreamOperation(Operation):
    """A 200 answer that is always an event stream (Litestar documents a ``Stream`` as JSON)."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if ok is not None:
            ok.content = {"text/event-stream": OpenAPIMediaType(schema=EVENT)}


@dataclasses.dataclass
class StreamingOperation(Operation):
    """A 200 answer that is JSON or, with ``stream: true``, an event stream; say both.

    Litestar documents a ``Model | EventStream`` annotation as a JSON oneOf with an empty
    schema, which every body matches twice (so no body is valid).
    """

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if ok is None or not ok.content:
            return
        schema = ok.content["application/json"].schema
        ref = next((s for s in getattr(schema, "one_of", None) or () if isinstance(s, Reference)), schema)
        ok.content = {
            "application/json": OpenAPIMediaType(schema=ref),
            "text/event-stream": OpenAPIMediaType(schema=EVENT),
        }
