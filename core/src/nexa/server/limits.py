"""The server's caps on what one request may ask for, checked before any work.

Counts (messages, tools, embedding inputs and their characters) and the JSON schemas a
request brings (``response_format``, tool ``parameters``): a backend turns a schema into a
grammar whose size follows the schema's numbers, not its bytes. ``{"type": "string",
"minLength": 10000000}`` is 40 bytes and a grammar of 50 MB; ``"maxLength": 50000``
crashes llama.cpp's grammar parser (nested repetitions overflow its stack). So every
schema is measured here, the same way for every backend: its size in bytes, how deep
schemas nest, every repetition count (``minLength``... and ``{m,n}`` in a ``pattern``),
the numbers it compares against, and an estimate of the grammar it becomes. Each cap is a
``ServerConfig`` field (``nexa serve --limit NAME=VALUE``); a refusal is a 400 naming the
field and the cap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import msgspec

from nexa.config import ServerConfig
from nexa.errors import BadRequest, PayloadTooLarge
from nexa.types import ChatRequest


def check_count(items: Sized | None, cap: int, param: str, what: str, setting: str) -> None:
    """At most ``cap`` items; the message names the setting that raises it."""
    count = len(items) if items is not None else 0
    if count > cap:
        raise BadRequest(
            f"{param} has {count} {what}; this server takes at most {cap} ({setting})",
            param=param, code="too_many_items",
        )


def check_chat(chat: ChatRequest, config: ServerConfig, *, tool_schema: str = "tools[{i}].function.parameters",
               response_schema: str = "response_format.json_schema.schema") -> None:
    """The caps on one chat task, whatever API dialect it came in: message and tool counts,
    and every JSON schema it carries (a tool's parameters, the response format's), against
    one grammar budget. ``tool_schema`` and ``response_schema`` name those fields in the
    dialect's own terms for the error's ``param``. Called by each converter before the
    task goes anywhere near a model."""
    check_count(chat.messages, config.max_messages, "messages", "messages", "max_messages")
    check_count(chat.tools, config.max_tools, "tools", "tools", "max_tools")
    budget = SchemaBudget(config)
    fmt = chat.response_format or {}
    spec = fmt.get("json_schema") if isinstance(fmt, Mapping) else None
    if isinstance(spec, Mapping) and spec.get("schema") is not None:
        check_schema(spec["schema"], response_schema, config, budget)
    for index, tool in enumerate(chat.tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        parameters = function.get("parameters") if isinstance(function, Mapping) else None
        if parameters is not None:
            check_schema(parameters, tool_schema.format(i=index), config, budget)


def check_embed_inputs(inputs: Sequence[str | Sequence[int]], config: ServerConfig) -> None:
    """Cheap bounds on embedding inputs (characters; tokens for token arrays), before any tokenizer runs."""
    total = 0
    for index, item in enumerate(inputs):
        size = len(item)
        if size > config.max_embed_input_chars:
            unit = "characters" if isinstance(item, str) else "tokens"
            raise PayloadTooLarge(
                f"input[{index}] is {size} {unit}; the limit is {config.max_embed_input_chars} "
                "(max_embed_input_chars)",
                param="input",
            )
        total += size
    if total > config.max_embed_total_chars:
        raise PayloadTooLarge(
            f"the inputs are {total} characters (or tokens) in all; the limit is "
            f"{config.max_embed_total_chars} (max_embed_total_chars): send fewer or shorter inputs per request",
            param="input",
        )


# --- JSON schemas -----------------------------------------------------------------------

# Keywords whose value is one schema, a list of schemas, or a map of name -> schema.
_ONE = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_REPEATS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
            "minContains", "maxContains")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_LARGEST_NUMBER = 2.0**63
"""Bounds beyond int64 are refused: grammars that enforce them grow with their digits."""


class SchemaBudget:
    """The grammar size left to one request's schemas (``max_grammar_size`` in all)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.used = 0

    def spend(self, amount: int, param: str) -> None:
        self.used += amount
        if self.used > self.config.max_grammar_size:
            raise BadRequest(
                f"{param}: the schemas of this request would become a grammar of about {self.used} "
                f"elements; the limit is {self.config.max_grammar_size} (max_grammar_size). Use smaller "
                "repetition counts (minLength, maxItems...), fewer enum values or a simpler schema",
                param=param, code="schema_too_large",
            )


def check_schema(schema: Any, param: str, config: ServerConfig, budget: SchemaBudget | None = None) -> None:
    """Refuse a JSON schema whose grammar would be too large, too deep, or too repetitive."""
    budget = budget or SchemaBudget(config)
    size = len(msgspec.json.encode(schema))
    if size > config.max_schema_bytes:
        raise BadRequest(f"{param} is {size} bytes; the limit is {config.max_schema_bytes} (max_schema_bytes)",
                         param=param, code="schema_too_large")
    stack: list[tuple[Any, int, str]] = [(schema, 1, param)]
    while stack:
        node, depth, where = stack.pop()
        if not isinstance(node, Mapping):
            continue  # true/false schemas, or not a schema (the backend's converter decides)
        if depth > config.max_schema_depth:
            raise BadRequest(f"{where}: schemas nest more than {config.max_schema_depth} deep (max_schema_depth)",
                             param=param, code="schema_too_deep")
        budget.spend(1, param)
        for key in _REPEATS:
            if key in node:
                budget.spend(_repeat(node[key], f"{where}.{key}", param, config), param)
        for key in _NUMBERS:
            if key in node:
                _number(node[key], f"{where}.{key}", param, key)
        if isinstance(node.get("pattern"), str):
            budget.spend(pattern_size(node["pattern"], f"{where}.pattern", param, config), param)
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
            # A schema is never fetched from anywhere: only references inside it.
            raise BadRequest(f"{where}.$ref must point inside the schema (#/...)", param=param,
                             code="invalid_schema")
        for key in ("enum", "examples"):
            if isinstance(node.get(key), list):
                budget.spend(len(node[key]), param)
        stack.extend(_children(node, depth, where, param, config, budget))


def _children(node: Mapping[str, Any], depth: int, where: str, param: str, config: ServerConfig,
              budget: SchemaBudget) -> Iterable[tuple[Any, int, str]]:
    for key in _ONE:
        if key in node:
            child = node[key]
            if isinstance(child, list):  # draft-4 tuple "items"
                yield from ((c, depth + 1, f"{where}.{key}[{i}]") for i, c in enumerate(child))
            else:
                yield child, depth + 1, f"{where}.{key}"
    for key in _LIST:
        if isinstance(node.get(key), list):
            yield from ((c, depth + 1, f"{where}.{key}[{i}]") for i, c in enumerate(node[key]))
    for key in _MAP:
        if isinstance(node.get(key), Mapping):
            for name, child in node[key].items():
                if key == "patternProperties":
                    budget.spend(pattern_size(name, f"{where}.{key}", param, config), param)
                yield child, depth + 1, f"{where}.{key}.{name}"


def _repeat(value: Any, where: str, param: str, config: ServerConfig) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise BadRequest(f"{where} must be a non-negative integer", param=param, code="invalid_schema")
    if value > config.max_schema_repeat:
        raise BadRequest(
            f"{where} is {int(value)}; this server allows at most {config.max_schema_repeat} "
            "(max_schema_repeat): a grammar repeats a rule that many times",
            param=param, code="schema_too_large",
        )
    return int(value)


def _number(value: Any, where: str, param: str, key: str) -> None:
    if isinstance(value, bool) and key in ("exclusiveMinimum", "exclusiveMaximum"):
        return  # draft 4 spelled these as flags
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{where} must be a finite number", param=param, code="invalid_schema")
    if abs(value) > _LARGEST_NUMBER or (key == "multipleOf" and value <= 0):
        raise BadRequest(f"{where} is out of range (|value| at most 2^63; multipleOf above 0)",
                         param=param, code="invalid_schema")


def pattern_size(pattern: str, where: str, param: str, config: ServerConfig) -> int:
    """The elements a grammar needs for ``pattern``: repetitions multiply what they repeat.

    ``a{1000}`` is a thousand elements and ``(a{100}){100}`` ten thousand, however short
    the pattern. Each ``{m,n}`` is also held to ``max_schema_repeat``. The pattern's
    syntax is left to the backend (an unreadable pattern is its 400).
    """
    # A stack of groups; each holds the size of what it has so far and of its last atom.
    groups: list[list[int]] = [[0, 0]]  # [total, last_atom]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
            _atom(groups, 1)
            continue
        if ch == "[":
            i = _skip_class(pattern, i)
            _atom(groups, 1)
            continue
        if ch == "(":
            groups.append([0, 0])
        elif ch == ")" and len(groups) > 1:
            inner = groups.pop()[0]
            _atom(groups, max(inner, 1))
        elif ch == "|":
            # Alternatives add up: the grammar holds each of them.
            groups[-1][1] = 0
        elif ch == "{":
            bounds, end = _braces(pattern, i)
            if bounds is not None:
                count = max(bounds)
                if count > config.max_schema_repeat:
                    raise BadRequest(
                        f"{where} repeats {count} times ({pattern[i:end]}); this server allows at most "
                        f"{config.max_schema_repeat} (max_schema_repeat)",
                        param=param, code="schema_too_large",
                    )
                last = groups[-1][1]
                groups[-1][0] += last * (count - 1)
                groups[-1][1] = last * count
                i = end
                continue
            _atom(groups, 1)
        elif ch not in "*+?^$":
            _atom(groups, 1)
        i += 1
    while len(groups) > 1:  # an unclosed group: count it as it stands
        inner = groups.pop()[0]
        _atom(groups, inner)
    return groups[0][0]


def _atom(groups: list[list[int]], size: int) -> None:
    groups[-1][0] += size
    groups[-1][1] = size


def _skip_class(pattern: str, start: int) -> int:
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _braces(pattern: str, start: int) -> tuple[tuple[int, ...] | None, int]:
    """``{m}``, ``{m,}`` or ``{m,n}`` at ``start``: the numbers and the index after ``}``."""
    end = pattern.find("}", start)
    if end < 0:
        return None, start + 1
    parts = pattern[start + 1:end].split(",")
    if len(parts) > 2 or not parts[0].strip().isdigit() or (len(parts) == 2 and parts[1].strip()
                                                             and not parts[1].strip().isdigit()):
        return None, start + 1
    numbers = tuple(int(p) for p in parts if p.strip())
    return numbers, end + 1
