"""The schema caps of ``nexa.server.limits``: what a grammar built from a schema may cost."""

from __future__ import annotations

import pytest

from nexa.config import ServerConfig
from nexa.errors import BadRequest
from nexa.server.limits import SchemaBudget, check_schema, pattern_size
from nexa.text import head_tokens

CONFIG = ServerConfig()


def refused(schema, config=CONFIG) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        check_schema(schema, "response_format", config)
    assert caught.value.param == "response_format"
    return caught.value


@pytest.mark.parametrize("schema", [
    {"type": "object"},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 100}, "tags": {
        "type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,20}$"}, "maxItems": 10}},
     "required": ["name"], "additionalProperties": False},
    {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}}, "$ref": "#/$defs/node"},
    {"type": "integer", "minimum": -(2**62), "maximum": 2**62, "exclusiveMinimum": True},
    {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
    {"anyOf": [{"type": "string", "minLength": 1000}, {"type": "null"}]},
    {"type": "object", "properties": {"minLength": {"type": "string"}, "maxItems": {"type": "integer"}}},
])
def test_ordinary_schemas_pass(schema):
    check_schema(schema, "response_format", CONFIG)


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "string", "minLength": 10_000_000}, ["minLength", "10000000", "max_schema_repeat"]),
    ({"type": "string", "maxLength": 50_000}, ["maxLength", "max_schema_repeat"]),
    ({"type": "array", "maxItems": 1_000_000}, ["maxItems"]),
    ({"type": "object", "minProperties": 5000}, ["minProperties"]),
    ({"type": "string", "pattern": "^a{100000}$"}, ["pattern", "100000"]),
    ({"type": "string", "pattern": "^(a{999}){999}$"}, ["max_grammar_size"]),
    ({"type": "string", "minLength": -1}, ["non-negative integer"]),
    ({"type": "string", "minLength": "5"}, ["non-negative integer"]),
    ({"type": "string", "minLength": True}, ["non-negative integer"]),
    ({"type": "number", "minimum": 1e300}, ["out of range"]),
    ({"type": "number", "multipleOf": 0}, ["out of range"]),
    ({"type": "number", "maximum": "big"}, ["finite number"]),
    ({"$ref": "https://example.com/schema.json"}, ["$ref"]),
    ({"enum": list(range(60_000))}, ["max_schema_bytes"]),
])
def test_amplifying_schemas_are_refused_naming_the_limit(schema, words):
    message = refused(schema).message
    for word in words:
        assert word in message, message


def test_nesting_cap():
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    assert "max_schema_depth" in refused(schema).message
    check_schema(schema, "p", ServerConfig(max_schema_depth=41))


def test_many_small_repetitions_add_up_across_a_request():
    config = ServerConfig(max_grammar_size=2500)
    budget = SchemaBudget(config)
    tool = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 900}}}
    check_schema(tool, "tools[0].function.parameters", config, budget)
    check_schema(tool, "tools[1].function.parameters", config, budget)
    with pytest.raises(BadRequest) as caught:
        check_schema(tool, "tools[2].function.parameters", config, budget)
    assert caught.value.param == "tools[2].function.parameters" and "2500" in caught.value.message


@pytest.mark.parametrize(("pattern", "size"), [
    ("abc", 3), ("^a{10}$", 10), ("(ab){3}", 6), ("(a{2}){3}", 6), ("a|b|c", 3), ("[a-z]{5}", 5),
    (r"\d{4}-\d{2}", 7), ("(x(y{4}){5}){2}", 42), ("a{3,}", 3), ("a{2,9}", 9), ("a{,5}", 5), ("((a)", 1),
])
def test_pattern_size_multiplies_nested_repetitions(pattern, size):
    assert pattern_size(pattern, "p", "p", CONFIG) == size


def test_head_tokens_stops_early_on_a_long_text():
    seen: list[int] = []

    def tokenize(text: str) -> list[int]:
        seen.append(len(text))
        return list(range(len(text.split())))

    ids, end = head_tokens(tokenize, "word " * 20_000, 256)
    assert len(ids) > 256 and end < 100_000 and seen == [end]
    ids, end = head_tokens(tokenize, "a few words", 256)
    assert len(ids) == 3 and end == len("a few words")
    # Sparse text (spaces): the prefix can't tell, so all of it is tokenized.
    ids, end = head_tokens(tokenize, "a" + " " * 10_000 + "b", 8)
    assert len(ids) == 2 and end == 10_002
