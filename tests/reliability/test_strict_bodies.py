"""Request bodies on every route: strict types, bounded nesting, clean names, capped counts.

- Types are checked strictly: ``"max_tokens": "3"``, ``"stream": "true"``, an enum value
  that isn't one, are a 400 naming the field (OpenAI's shape), never coerced. (2.0 is an
  integer, as JSON Schema and the OpenAPI document say.)
- JSON nested ~1000 deep (anywhere: the whole body, a tool's parameters, a schema, a
  field the server ignores) is a 400, never a RecursionError 500; and past
  ``max_json_depth`` (64) a 400 naming where.
- A model name with a control character or space at either end (``"test/echo\\n"``) is a
  400 before any lookup.
- The caps of docs/reliability.md's table (message count, tool count, per-field sizes,
  embedding characters), each at its default and lowered through ``ServerConfig``, are
  refused before any work: the model is never loaded for a refused request.
"""

from __future__ import annotations

import json

import httpx
import pytest

import relkit
from nexa import cli
from nexa.testing import EchoBackend, echo_manifest, serve

MODEL = "test/echo"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
EMBED = {"model": MODEL, "input": "hello"}
IMAGES = {"model": MODEL, "prompt": "a square", "size": "64x64", "response_format": "b64_json"}


@pytest.fixture
def server(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(MODEL)]) as handle:
        yield handle


@pytest.fixture
def tight(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(MODEL)], max_messages=3, max_tools=2,
               max_json_depth=12, max_schema_bytes=200, max_embed_total_chars=100) as handle:
        yield handle


def post(server, path, body):
    if isinstance(body, (bytes, str)):
        return httpx.post(server.base_url + path, content=body, timeout=60, headers={"Content-Type": "application/json"})
    return httpx.post(server.base_url + path, json=body, timeout=60)


def not_loaded(server) -> bool:
    """Nothing was run: the model a refused request names was never even loaded."""
    return server.app.state.manager.loaded() == []


# --- strict types ------------------------------------------------------------------------

WRONG_TYPES = [
    ("/v1/chat/completions", CHAT, {"max_tokens": "3"}, "max_tokens"),
    ("/v1/chat/completions", CHAT, {"max_completion_tokens": "3"}, "max_completion_tokens"),
    ("/v1/chat/completions", CHAT, {"temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", CHAT, {"top_p": "1"}, "top_p"),
    ("/v1/chat/completions", CHAT, {"seed": "7"}, "seed"),
    ("/v1/chat/completions", CHAT, {"stream": "true"}, "stream"),
    ("/v1/chat/completions", CHAT, {"stream": 1}, "stream"),
    ("/v1/chat/completions", CHAT, {"n": "1"}, "n"),
    ("/v1/chat/completions", CHAT, {"n": 1.5}, "n"),
    ("/v1/chat/completions", CHAT, {"stop": 5}, "stop"),
    ("/v1/chat/completions", CHAT, {"tool_choice": "sometimes"}, "tool_choice"),
    ("/v1/chat/completions", CHAT, {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", CHAT, {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("/v1/chat/completions", CHAT, {"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", CHAT, {"model": 5}, "model"),
    ("/v1/embeddings", EMBED, {"encoding_format": "binary"}, "encoding_format"),
    ("/v1/embeddings", EMBED, {"dimensions": "8"}, "dimensions"),
    ("/v1/embeddings", EMBED, {"input": 5}, "input"),
    ("/v1/images/generations", IMAGES, {"n": "1"}, "n"),
    ("/v1/images/generations", IMAGES, {"size": 64}, "size"),
    ("/v1/images/generations", IMAGES, {"guidance_scale": "7"}, "guidance_scale"),
    ("/v1/images/generations", IMAGES, {"response_format": "png"}, "response_format"),
]


@pytest.mark.parametrize(("path", "base", "change", "param"), WRONG_TYPES,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{json.dumps(c)[:40]}" for p, _, c, _ in WRONG_TYPES])
def test_wrong_types_are_400_naming_the_field(server, path, base, change, param):
    err = relkit.assert_error(post(server, path, {**base, **change}), 400)
    assert err["param"] == param, err
    assert f"'{param}'" in err["message"], err
    assert err["code"] in ("invalid_type", "invalid_value"), err
    assert not_loaded(server)
    assert post(server, path, base).status_code == 200


def test_a_missing_field_is_named(server):
    err = relkit.assert_error(post(server, "/v1/chat/completions", {"messages": CHAT["messages"]}), 400,
                              "missing_required_parameter")
    assert err["param"] == "model"


def test_integral_numbers_are_integers(server):
    """JSON has one number type; 2.0 is an integer to JSON Schema and to the document."""
    r = post(server, "/v1/images/generations", {**IMAGES, "n": 2.0})
    assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
    r = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 8.0})
    assert r.status_code == 200, r.text


# --- nesting -----------------------------------------------------------------------------


def _chat_with(slot: str) -> str:
    return json.dumps(CHAT)[:-1] + ", " + slot + "}"


DEEP = 1000
DEEP_BODIES = {
    "whole body array": "[" * DEEP + "]" * DEEP,
    "whole body object": '{"a":' * DEEP + "1" + "}" * DEEP,
    "tool parameters": _chat_with('"tools": [{"type": "function", "function": {"name": "f", "parameters": {"x": '
                                  + "[" * DEEP + "]" * DEEP + "}}}]"),
    "response_format schema": _chat_with('"response_format": {"type": "json_schema", "json_schema": {"schema": '
                                         + '{"properties":' * DEEP + "{}" + "}" * DEEP + "}}"),
    "an ignored field": _chat_with('"zzz": ' + "[" * DEEP + "]" * DEEP),
    "message content": _chat_with('"messages": [{"role": "user", "content": ' + "[" * DEEP + "]" * DEEP + "}]")
    .replace('"messages": [{"role": "user", "content": "hello"}], ', ""),
}


@pytest.mark.parametrize("where", sorted(DEEP_BODIES))
def test_json_nested_1000_deep_is_400(server, where):
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/images/generations"):
        err = relkit.assert_error(post(server, path, DEEP_BODIES[where]), 400)
        assert err["code"] in ("nested_too_deeply", "invalid_type", "missing_required_parameter"), err
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_past_the_depth_cap_is_400_naming_where(server):
    # tools[0].function.parameters is 4 levels down; "default" is data, not a schema.
    for field, slot in (("tools[0].function.parameters", lambda v: {"tools": [{"type": "function", "function": {
                            "name": "f", "parameters": {"type": "object", "default": v}}}]}),
                        ("response_format.json_schema.schema", lambda v: {"response_format": {
                            "type": "json_schema", "json_schema": {"schema": {"type": "array", "default": v}}}})):
        err = relkit.assert_error(post(server, "/v1/chat/completions", {**CHAT, **slot(_nested(100))}), 400,
                                  "nested_too_deeply")
        assert err["param"].startswith(field), err
        assert "64" in err["message"]
        assert post(server, "/v1/chat/completions", {**CHAT, **slot(_nested(40))}).status_code == 200


def test_a_lowered_depth_cap(tight):
    body = {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "default": _nested(10)}}}]}
    err = relkit.assert_error(post(tight, "/v1/chat/completions", body), 400, "nested_too_deeply")
    assert "12" in err["message"]


# --- model names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [MODEL + "\n", MODEL + "\r\n", " " + MODEL, MODEL + " ", MODEL + "\t",
                                  "test/\u0000echo", "test/ec\u0085ho", MODEL + "\u007f", ""])
def test_model_names_with_control_characters_are_400_before_any_lookup(server, name):
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/embeddings", EMBED),
                       ("/v1/images/generations", IMAGES)):
        err = relkit.assert_error(post(server, path, {**base, "model": name}), 400)
        assert err["param"] == "model" and err["code"] != "model_not_found", err
        assert name not in err["message"] or not name.strip(), "the bad name is echoed back"
    assert not_loaded(server)


# --- counts and sizes ----------------------------------------------------------------------


def test_10000_messages_are_refused_before_any_work(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 10_000}
    err = relkit.assert_error(post(server, "/v1/chat/completions", body), 400, "too_many_items")
    assert err["param"] == "messages" and "4096" in err["message"] and "max_messages" in err["message"]
    assert not_loaded(server)
    # 4096 are taken (and then overflow the echo model's 256-token context).
    r = post(server, "/v1/chat/completions", {**body, "messages": body["messages"][:4096]})
    relkit.assert_error(r, 400, "context_length_exceeded")


def _tools(n: int) -> list[dict]:
    return [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(n)]


def test_tool_count_cap(server, tight):
    err = relkit.assert_error(post(server, "/v1/chat/completions", {**CHAT, "tools": _tools(129)}), 400,
                              "too_many_items")
    assert err["param"] == "tools" and "128" in err["message"]
    assert post(server, "/v1/chat/completions", {**CHAT, "tools": _tools(128)}).status_code == 200
    relkit.assert_error(post(tight, "/v1/chat/completions", {**CHAT, "tools": _tools(3)}), 400, "too_many_items")
    assert post(tight, "/v1/chat/completions", {**CHAT, "tools": _tools(2)}).status_code == 200


def test_a_lowered_message_cap(tight):
    messages = [{"role": "user", "content": "hi"}]
    relkit.assert_error(post(tight, "/v1/chat/completions", {**CHAT, "messages": messages * 4}), 400, "too_many_items")
    assert post(tight, "/v1/chat/completions", {**CHAT, "messages": messages * 3}).status_code == 200


@pytest.mark.parametrize(("change", "param"), [
    ({"messages": [{"role": "user", "content": "hi", "name": "n" * 257}]}, "messages[0].name"),
    ({"messages": [{"role": "tool", "content": "hi", "tool_call_id": "i" * 257}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "i" * 257, "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].id"),
    ({"stop": "s" * 257}, "stop"),
    ({"stop": ["s", "s" * 257]}, "stop[1]"),
    ({"user": "u" * 257}, "user"),
    ({"model": "m" * 257}, "model"),
    ({"tools": [{"type": "function", "function": {"name": "f" * 65}}]}, "tools[0].function.name"),
])
def test_per_field_size_caps(server, change, param):
    err = relkit.assert_error(post(server, "/v1/chat/completions", {**CHAT, **change}), 400)
    assert err["param"] == param, err


def test_schema_byte_cap(server, tight):
    big = {"type": "object", "description": "d" * 70_000}
    for body in ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": big}}]},
                 {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": big}}}):
        err = relkit.assert_error(post(server, "/v1/chat/completions", body), 400, "schema_too_large")
        assert "65536" in err["message"]
    small = {"type": "object", "description": "d" * 300}
    err = relkit.assert_error(post(tight, "/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"schema": small}}}), 400, "schema_too_large")
    assert "200" in err["message"]


def test_embedding_characters_are_capped_before_tokenizing(server, tight):
    """The issue's abuse: 512 inputs of 20,000 characters (10 MB) is refused at once."""
    err = relkit.assert_error(post(server, "/v1/embeddings", {"model": MODEL, "input": ["word " * 4000] * 512}), 413)
    assert "max_embed_total_chars" in err["message"]
    assert not_loaded(server)
    relkit.assert_error(post(tight, "/v1/embeddings", {"model": MODEL, "input": ["a" * 40] * 3}), 413)
    relkit.assert_error(post(tight, "/v1/embeddings", {"model": MODEL, "input": [[1] * 40] * 3}), 413)
    assert post(tight, "/v1/embeddings", {"model": MODEL, "input": ["a" * 40] * 2}).status_code == 200


# --- the --limit flag ----------------------------------------------------------------------


def test_serve_limit_flag_sets_caps():
    args = cli.build_parser().parse_args(["serve", "--limit", "max_messages=10000", "--limit", "max-tools=8",
                                          "--limit", "max_image_n=2"])
    config = cli._server_config(args)
    assert (config.max_messages, config.max_tools, config.max_image_n) == (10000, 8, 2)
    for bad in ("max_nothing=3", "max_messages", "max_messages=x", "max_messages=0", "max_image_n=5"):
        with pytest.raises(SystemExit):
            cli._server_config(cli.build_parser().parse_args(["serve", "--limit", bad]))


# --- the other dialects: Anthropic Messages and OpenAI Responses ---------------------------

MESSAGES = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
RESPONSES = {"model": MODEL, "input": "hello"}


def anthropic_error(resp, status: int) -> str:
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:300]}"
    return relkit.check_anthropic_error_body(resp.json())["message"]


@pytest.mark.parametrize(("change", "field"), [({"max_tokens": "8"}, "max_tokens"), ({"stream": "true"}, "stream"),
                                               ({"temperature": "1"}, "temperature"), ({"model": MODEL + "\n"}, "model"),
                                               ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role")])
def test_messages_route_is_strict_too(server, change, field):
    assert f"'{field}'" in anthropic_error(post(server, "/v1/messages", {**MESSAGES, **change}), 400)
    assert post(server, "/v1/messages", MESSAGES).status_code == 200


@pytest.mark.parametrize(("change", "field"), [({"max_output_tokens": "8"}, "max_output_tokens"),
                                               ({"stream": "true"}, "stream"), ({"model": MODEL + "\n"}, "model")])
def test_responses_route_is_strict_too(server, change, field):
    err = relkit.assert_error(post(server, "/v1/responses", {**RESPONSES, **change}), 400)
    assert err["param"] == field, err
    assert post(server, "/v1/responses", RESPONSES).status_code == 200


def test_the_other_dialects_share_the_caps(server):
    deep = "[" * DEEP + "]" * DEEP
    body = json.dumps(MESSAGES)[:-1] + ', "tools": [{"name": "f", "input_schema": {"x": ' + deep + "}}]}"
    assert "nested too deeply" in anthropic_error(post(server, "/v1/messages", body), 400)
    many = {**MESSAGES, "messages": [{"role": "user", "content": "hi"}] * 10_000}
    assert "max_messages" in anthropic_error(post(server, "/v1/messages", many), 400)
    items = {**RESPONSES, "input": [{"role": "user", "content": "hi"}] * 10_000}
    relkit.assert_error(post(server, "/v1/responses", items), 400, "too_many_items")
    abusive = {"type": "string", "minLength": 10_000_000}
    for message in (
        anthropic_error(post(server, "/v1/messages", {**MESSAGES, "tools": [{"name": "f", "input_schema": abusive}]}),
                        400),
        anthropic_error(post(server, "/v1/messages", {**MESSAGES, "output_config": {
            "format": {"type": "json_schema", "schema": abusive}}}), 400),
    ):
        assert "max_schema_repeat" in message
    for body in ({**RESPONSES, "tools": [{"type": "function", "name": "f", "parameters": abusive}]},
                 {**RESPONSES, "text": {"format": {"type": "json_schema", "name": "a", "schema": abusive}}}):
        err = relkit.assert_error(post(server, "/v1/responses", body), 400, "schema_too_large")
        assert "max_schema_repeat" in err["message"]
    assert not_loaded(server)
