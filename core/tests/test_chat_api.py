"""The rest of the chat API over HTTP on the echo test double: the unknown-field policy,
fields a backend can't honour, the reasoning split the server runs for backends without
one, tool-call framing, one call when parallel calls are off, the deprecated functions.

Reasoning itself is proven on real backends (the MLX plugin's scripted models); here the
echo double only supplies text so that the HTTP mechanics can be checked.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from nexa.backend import Backend
from nexa.testing import EchoBackend, echo_manifest, serve
from nexa.types import ChatChunk, ToolCall, Usage

USER = [{"role": "user", "content": "one two three"}]
THINKS = [{"role": "user", "content": "<think> a b </think> c d"}]
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


class CallingEcho(EchoBackend):
    """Test double: calls ``lookup`` twice, the first call streamed in three pieces; has no
    text completions (the base class's default)."""

    name = "calling-echo"
    formats = frozenset({"calling-echo"})
    complete = Backend.complete

    def chat(self, request, cancel):
        if not request.tools:
            yield from super().chat(request, cancel)
            return
        yield ChatChunk(content="checking")
        yield ChatChunk(tool_calls=(ToolCall("call_a", "lookup", ""),))
        yield ChatChunk(tool_calls=(ToolCall("call_a", "", '{"q": '),))
        yield ChatChunk(tool_calls=(ToolCall("call_a", "", '"x"}'),))
        yield ChatChunk(tool_calls=(ToolCall("call_b", "lookup", '{"q": "y"}'),))
        yield ChatChunk(finish_reason="tool_calls", usage=Usage(3, 5))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    calling = echo_manifest("test/calling")
    calling = type(calling)(**{**{a: getattr(calling, a) for a in ("name", "tasks", "source", "options")},
                               "format": "calling-echo"})
    with serve([EchoBackend, CallingEcho], home=tmp_path_factory.mktemp("home"),
               models=[echo_manifest(), calling]) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def post(server, body, path="/v1/chat/completions"):
    return httpx.post(server.base_url + path, json=body, timeout=30)


def error_of(response, status=400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# --- the unknown-field policy -------------------------------------------------------------


def test_accepted_and_ignored_fields_change_nothing(server):
    ignored = {"user": "u1", "metadata": {"k": "v"}, "store": True, "service_tier": "flex",
               "prompt_cache_key": "key", "prompt_cache_retention": "24h", "safety_identifier": "s",
               "verbosity": "low", "stream_options": None, "modalities": ["text"],
               # Outside OpenAI's spec: vendor extensions are ignored.
               "mirostat": 2, "cache_prompt": True, "some_vendor_flag": {"x": 1}}
    r = post(server, {"model": "test/echo", "messages": USER, **ignored})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "one two three"


@pytest.mark.parametrize("field, value", [
    ("n", 2),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
])
def test_fields_this_server_cannot_honour_are_400s(server, field, value):
    # A list names the refused entry: "modalities[1]" for ["text", "audio"].
    assert error_of(post(server, {"model": "test/echo", "messages": USER, field: value}))["param"].startswith(field)


@pytest.mark.parametrize("body, param", [
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"think": False}, "think"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ({"reasoning_budget": 10}, "reasoning_budget"),
])
def test_fields_the_backend_cannot_honour_are_400s_naming_them(server, body, param):
    """The echo double declares no capabilities: each field is refused, never ignored."""
    error = error_of(post(server, {"model": "test/echo", "messages": USER, **body}))
    assert error["param"] == param and "echo" in error["message"]
    error = error_of(post(server, {"model": "test/echo", "messages": USER, "stream": True, **body}))
    assert error["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_effort": "none", "think": True}, "think"),
    ({"reasoning_budget": 5, "reasoning_effort": "none"}, "reasoning_budget"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"reasoning_format": "none"}, "reasoning_format"),
    ({"functions": [LOOKUP["function"]], "tools": [LOOKUP]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    # Named like one of the server's own resources: still the client's 400, not a 500.
    ({"store": 5}, "store"),
    ({"metadata": {"k": 1}}, "metadata"),
])
def test_bad_values_of_the_new_fields_are_400s(server, body, param):
    # The schema names a bad map entry as the map's field, "logit_bias[...]".
    assert error_of(post(server, {"model": "test/echo", "messages": USER, **body}))["param"].startswith(param)


# --- reasoning, split by the server for a backend that does not split it -------------------


def test_the_server_splits_a_think_block_off_the_content(client):
    answer = client.chat.completions.create(model="test/echo", messages=THINKS)
    assert answer.choices[0].message.content == "c d"
    assert answer.choices[0].message.model_extra["reasoning_content"] == "a b"
    assert answer.usage.completion_tokens_details.reasoning_tokens == 4
    chunks = list(client.chat.completions.create(model="test/echo", messages=THINKS, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "c d"
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "a b"
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 4


def test_a_plain_answer_has_no_reasoning_field_and_details_are_zero(server):
    body = post(server, {"model": "test/echo", "messages": USER}).json()
    assert "reasoning_content" not in body["choices"][0]["message"]
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_stop_strings_cut_the_answer_not_the_thought(client):
    answer = client.chat.completions.create(model="test/echo", messages=THINKS, stop=["b", "d"])
    assert answer.choices[0].message.content == "c "
    assert answer.choices[0].message.model_extra["reasoning_content"] == "a b"


def test_formats_of_the_servers_split(client):
    inline = client.chat.completions.create(model="test/echo", messages=THINKS,
                                            extra_body={"reasoning_format": "inline"}, stop=["a"])
    # The thought is back in the content as written; the stop string still cuts the answer only.
    assert inline.choices[0].message.content == "<think> a b </think> c d"
    hidden = client.chat.completions.create(model="test/echo", messages=THINKS,
                                            extra_body={"reasoning_format": "hidden"})
    assert hidden.choices[0].message.content == "c d"
    assert hidden.choices[0].message.model_extra.get("reasoning_content") is None
    assert hidden.usage.completion_tokens_details.reasoning_tokens == 4


def test_reasoning_content_of_earlier_turns_is_accepted(client):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
                {"role": "user", "content": "one two"}]
    assert client.chat.completions.create(model="test/echo", messages=messages).choices[0].message.content == "one two"


# --- tool calls ---------------------------------------------------------------------------


def test_tool_call_pieces_stream_with_index_then_arguments(client):
    chunks = list(client.chat.completions.create(model="test/calling", messages=USER, tools=[LOOKUP], stream=True))
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [(p.index, p.id, p.function.name, p.function.arguments) for p in pieces] == [
        (0, "call_a", "lookup", ""), (0, None, None, '{"q": '), (0, None, None, '"x"}'),
        (1, "call_b", "lookup", '{"q": "y"}')]
    whole = client.chat.completions.create(model="test/calling", messages=USER, tools=[LOOKUP])
    calls = whole.choices[0].message.tool_calls
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_a", "lookup", {"q": "x"}), ("call_b", "lookup", {"q": "y"})]
    assert whole.choices[0].message.content == "checking"


def test_parallel_tool_calls_false_keeps_the_first_call(client):
    whole = client.chat.completions.create(model="test/calling", messages=USER, tools=[LOOKUP],
                                           parallel_tool_calls=False)
    (call,) = whole.choices[0].message.tool_calls
    assert (call.id, json.loads(call.function.arguments)) == ("call_a", {"q": "x"})
    assert whole.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(model="test/calling", messages=USER, tools=[LOOKUP],
                                                 parallel_tool_calls=False, stream=True))
    indexes = {tc.index for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()}
    assert indexes == {0}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_deprecated_functions_answer_with_function_call(server):
    body = {"model": "test/echo", "messages": USER, "functions": [LOOKUP["function"]],
            "function_call": {"name": "lookup"}}
    answer = post(server, body).json()["choices"][0]
    assert answer["finish_reason"] == "function_call"
    assert answer["message"]["function_call"]["name"] == "lookup"
    assert json.loads(answer["message"]["function_call"]["arguments"]) == {"text": "one two three"}
    assert answer["message"].get("tool_calls") is None
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert [d["function_call"]["name"] for d in deltas if "function_call" in d] == ["lookup"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "function_call"
    # An earlier function_call turn is accepted as history.
    history = USER + [{"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": "{}"}},
                      {"role": "function", "name": "lookup", "content": "found"}, {"role": "user", "content": "ok"}]
    assert post(server, {"model": "test/echo", "messages": history}).status_code == 200


# --- legacy completions and the document ----------------------------------------------------


def test_completions_wire_on_the_echo_double(client, server):
    done = client.completions.create(model="test/echo", prompt="a b c d", max_tokens=3)
    assert (done.choices[0].text, done.choices[0].finish_reason, done.object) == ("a b c", "length", "text_completion")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (4, 3)
    several = client.completions.create(model="test/echo", prompt=["a b", "c"], echo=True, stop=["b"])
    assert [(c.index, c.text) for c in several.choices] == [(0, "a ba "), (1, "cc")]
    assert client.completions.create(model="test/echo", prompt=["a b", "c"]).usage.prompt_tokens == 3
    events = list(client.completions.create(model="test/echo", prompt="a b c", stream=True, max_tokens=2,
                                            stream_options={"include_usage": True}))
    assert "".join(e.choices[0].text for e in events if e.choices) == "a b"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 2
    assert error_of(post(server, {"model": "test/echo", "prompt": "hi", "logprobs": 1}, "/v1/completions"))["param"] \
        == "logprobs"
    assert error_of(post(server, {"model": "test/echo", "prompt": "hi", "suffix": "x"}, "/v1/completions"))["param"] \
        == "suffix"


def test_completions_on_a_backend_without_them_is_a_400(server):
    error = error_of(post(server, {"model": "test/calling", "prompt": "hi"}, "/v1/completions"))
    assert error["code"] == "model_not_supported"
    error = error_of(post(server, {"model": "test/calling", "prompt": "hi", "stream": True}, "/v1/completions"))
    assert error["code"] == "model_not_supported"
    assert error_of(post(server, {"model": "test/echo", "prompt": "hi", "echo": True, "logprobs": 1},
                         "/v1/completions"))["param"] == "echo"
    assert error_of(post(server, {"model": "test/echo", "prompt": ["a", 5]}, "/v1/completions"))["param"] == "prompt"
    assert error_of(post(server, {"model": "test/echo", "prompt": "a", "best_of": 2}, "/v1/completions"))["param"] \
        == "best_of"


def test_at_most_16_prompts_but_a_token_array_of_any_length(server):
    """The document caps lists of prompts at 16 and leaves one token array unbounded, as
    OpenAI does: a 40-token prompt is one prompt (it was refused as 40 prompts)."""
    tokens = list(range(1, 41))
    done = post(server, {"model": "test/echo", "prompt": tokens, "max_tokens": 1}, "/v1/completions")
    assert done.status_code == 200, done.text
    assert len(done.json()["choices"]) == 1
    assert len(post(server, {"model": "test/echo", "prompt": ["a"] * 16, "max_tokens": 1},
                    "/v1/completions").json()["choices"]) == 16
    for prompts in (["a"] * 17, [[1, 2]] * 17):
        error = error_of(post(server, {"model": "test/echo", "prompt": prompts}, "/v1/completions"))
        assert (error["param"], error["code"]) == ("prompt", "too_many_items"), error


def test_the_document_describes_the_new_fields(server):
    doc = httpx.get(server.base_url + "/schema/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "reasoning_content" in schemas["ChoiceMessage"]["properties"]
    assert "reasoning_content" in schemas["ChunkDelta"]["properties"]
    assert "completion_tokens_details" in schemas["UsageWire"]["properties"]
    request = schemas["ChatCompletionRequest"]["properties"]
    for field in ("logprobs", "top_logprobs", "logit_bias", "reasoning_effort", "chat_template_kwargs", "think",
                  "reasoning_format", "reasoning_budget", "parallel_tool_calls", "metadata", "verbosity"):
        assert field in request, field
    assert "/v1/completions" in doc["paths"]
