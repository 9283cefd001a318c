"""GBNF grammars that force JSON output: ``response_format`` and forced tool calls.

Built with llama-cpp-python's JSON-schema converter (a port of llama.cpp's
``json_schema_to_grammar``), imported only when a request needs a grammar. A schema
the converter cannot handle is the client's 400, not a crash.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from nexa.errors import BadRequest
from nexa_llama_cpp.tools import CLOSE_TAG, OPEN_TAG, call_schema, tool_functions


def schema_gbnf(schema: Mapping[str, Any], *, what: str = "response_format") -> str:
    """GBNF for one JSON value matching ``schema`` (root rule ``root``)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions/KeyErrors on odd schemas
        raise BadRequest(
            f"{what}: JSON schema not supported for constrained output "
            f"({type(exc).__name__}: {exc})",
            param=what,
        ) from exc


def response_format_gbnf(response_format: Mapping[str, Any] | None) -> str | None:
    """The grammar for OpenAI's ``response_format``; None for ``text`` or absent."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_gbnf({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if schema is None:
            # OpenAI allows omitting the schema; any JSON object then.
            schema = {"type": "object"}
        if not isinstance(schema, Mapping):
            raise BadRequest("response_format.json_schema.schema must be an object",
                             param="response_format")
        return schema_gbnf(schema)
    raise BadRequest(f"unsupported response_format type {kind!r}", param="response_format")


def forced_call_gbnf(
    tools: Sequence[Mapping[str, Any]], name: str | None, *, tagged: bool
) -> str:
    """GBNF for exactly one call: to ``name``, or to any tool when ``name`` is None.

    ``tagged`` wraps it the way Hermes/Qwen templates teach the model to write calls
    (``<tool_call>\\n{json}\\n</tool_call>``), so forcing keeps the model on familiar
    ground; otherwise the call is a bare JSON object.
    """
    functions = tool_functions(tools)
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
    if not functions:
        raise BadRequest(
            f"tool_choice names a function ({name!r}) that is not in tools"
            if name else "tool_choice requires tools",
            param="tool_choice",
        )
    body = schema_gbnf(call_schema(functions), what="tools")
    if not tagged:
        return body
    # Rename the converter's root so ours can wrap it; other rules keep their names.
    body = re.sub(r"^root ::=", "tool-call-json ::=", body, count=1, flags=re.M)
    return (
        f"root ::= {json.dumps(OPEN_TAG + chr(10))} tool-call-json "
        f"{json.dumps(chr(10) + CLOSE_TAG)}\n{body}"
    )
