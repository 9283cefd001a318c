"""Corrections to the OpenAPI document Litestar generates, so ``/schema`` tells the truth."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Reference, Schema
from litestar.plugins import OpenAPISchemaPlugin
from litestar.typing import FieldDefinition

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

    Litestar documents a ``Model | Chunk | EventStream`` annotation as a JSON oneOf with an
    empty schema, which every body matches twice (so no body is valid). The first model is
    the JSON answer; a second one, when the annotation names it, is one event's JSON (its
    ``contentSchema``), so the document describes the streamed fields too.
    """

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if ok is None or not ok.content:
            return
        schema = ok.content["application/json"].schema
        refs = [s for s in getattr(schema, "one_of", None) or () if isinstance(s, Reference)]
        data = Schema(type=OpenAPIType.STRING)
        if len(refs) > 1:
            event = Schema(type=OpenAPIType.STRING, content_media_type="application/json",
                           content_schema=Schema(any_of=[refs[1], Reference("#/components/schemas/ErrorResponse")]))
            data = Schema(any_of=[Schema(const="[DONE]"), event])
        ok.content = {
            "application/json": OpenAPIMediaType(schema=refs[0] if refs else schema),
            # OpenAPI 3.1: the schema of an event stream describes one event.
            "text/event-stream": OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.OBJECT,
                    required=["data"],
                    properties={"data": data},
                    description="Each event's data is one chunk (or an error) as JSON; the last is `[DONE]`",
                )
            ),
        }


@dataclasses.dataclass
class TranscriptionOperation(Operation):
    """A transcription's 200: JSON (``json``/``verbose_json``), text (``text``, ``srt``,
    ``vtt``) or, with ``stream: true``, an event stream of ``transcript.text.*`` events."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if ok is None or not ok.content:
            return
        schema = ok.content["application/json"].schema
        refs = [s for s in getattr(schema, "one_of", None) or () if isinstance(s, Reference)]
        text = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
        ok.content = {
            "application/json": OpenAPIMediaType(schema=Schema(any_of=refs) if len(refs) > 1 else schema),
            "text/plain": text,
            "text/vtt": text,
            "text/event-stream": OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.OBJECT,
                    required=["data"],
                    properties={"data": Schema(type=OpenAPIType.STRING)},
                    description="Each event's data is a transcript.text.delta or transcript.text.done "
                    "event (or an error) as JSON; the last is `[DONE]`",
                )
            ),
        }


class ClosedBodies(OpenAPISchemaPlugin):
    """A body that refuses unknown fields (a Struct with ``forbid_unknown_fields``, the
    management calls) says so with ``additionalProperties: false``; Litestar's own Struct
    schema leaves it out, so the document would allow what the server refuses."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return (not field_definition.is_union and field_definition.is_subclass_of(msgspec.Struct)
                and field_definition.type_.__struct_config__.forbid_unknown_fields)

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        # The schema Litestar would make (the next plugin that takes Structs), closed.
        plugin = next(p for p in schema_creator.plugins
                      if p is not self and schema_creator.plugin_supports_field(p, field_definition))
        schema = plugin.to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        return schema
