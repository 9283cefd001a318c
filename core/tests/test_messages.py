"""Anthropic's Messages API (``/v1/messages``) through the official ``anthropic`` SDK.

Protocol mechanics only, on declared test doubles: the echo backend and ``ScriptedEcho``
(``agent_doubles``), which records what each body was translated into and scripts
reasoning, tool calls and failures. Real-model answers through this API are checked in
``tests/test_agents.py`` (SmolLM2 on llama.cpp).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time

import anthropic
import httpx
import openai
import pytest
from agent_doubles import ECHO, SCRIPT, THINKER, ScriptedEcho, last_request, scripted_server
from PIL import Image

from nexa.testing import EchoBackend, echo_manifest, serve
from nexa.types import ImagePart, Reasoning

USER = [{"role": "user", "content": "one two three four"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLOCK = {"name": "get_time", "description": "The time", "input_schema": {"type": "object", "properties": {}}}


@pytest.fixture
def server(home):
    with scripted_server(home) as handle:
        yield handle


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)



def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def raw_events(server, body, **headers):
    """The (event name, data) pairs of a raw stream, in order."""
    with httpx.stream("POST", server.base_url + "/v1/messages", json={**body, "stream": True},
                      headers=headers, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = resp.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:], block
        events.append((name_line[7:], data))
    return events


# --- plain text ------------------------------------------------------------------------


def test_create_text(client):
    message = client.messages.create(model=ECHO, max_tokens=64, messages=USER)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == ECHO
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "one two three four"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 4)


def test_max_tokens_cut_is_stop_reason_max_tokens(client):
    message = client.messages.create(model=ECHO, max_tokens=2, messages=USER)
    assert message.content[0].text == "one two"
    assert message.stop_reason == "max_tokens"


def test_max_tokens_has_no_upper_bound(client):
    # The SDK itself wants a stream past ~21k tokens (its time estimate), as agents do.
    assert client.messages.create(model=ECHO, max_tokens=20_000, messages=USER).stop_reason == "end_turn"
    with client.messages.stream(model=ECHO, max_tokens=1_000_000, messages=USER) as stream:
        assert stream.get_final_message().stop_reason == "end_turn"


def test_stop_sequence_is_reported(client):
    message = client.messages.create(model=ECHO, max_tokens=64, messages=USER, stop_sequences=["three"])
    assert message.content[0].text == "one two "
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "three"


def test_sampling_and_system_reach_the_backend(client):
    # The SDK no longer names the sampling fields; agents built on older ones still send them.
    client.messages.create(
        model=SCRIPT, max_tokens=7, extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 5}, messages=USER,
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0; nonce=81f3"},
                {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in English."}],
        metadata={"user_id": "someone"},
    )
    request = last_request()
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (7, 0.2, 0.9, 5)
    # The per-request billing nonce is gone, so two turns share their prefix.
    assert request.messages[0].role == "system"
    assert request.messages[0].content == "You are terse.\n\nAnswer in English."
    assert request.messages[1].content == "one two three four"


def test_billing_header_only_changes_nothing(client):
    for nonce in ("a1", "b2"):
        client.messages.create(model=SCRIPT, max_tokens=8, messages=USER, system=[
            {"type": "text", "text": f"x-anthropic-billing-header: nonce={nonce}"}, {"type": "text", "text": "Sys"}])
    first, second = ScriptedEcho.requests[-2:]
    assert first.messages == second.messages


def test_unknown_fields_beta_query_and_headers_are_accepted(server):
    r = httpx.post(server.base_url + "/v1/messages?beta=true", timeout=30, headers={
        "anthropic-beta": "context-management-2025-06-27,interleaved-thinking-2025-05-14",
        "anthropic-version": "2023-06-01"}, json={
        "model": ECHO, "max_tokens": 32, "messages": USER, "context_management": {"edits": []},
        "container": None, "mcp_servers": [], "client_metadata": {"x": 1}, "service_tier": "auto"})
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == "one two three four"


# --- streaming -------------------------------------------------------------------------


def test_stream_event_sequence(server):
    events = raw_events(server, {"model": ECHO, "max_tokens": 64, "messages": USER})
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[2] == "content_block_start" and events[2][1]["content_block"] == {"type": "text", "text": ""}
    assert names[3:7] == ["content_block_delta"] * 4
    assert names[7:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "one two three four"
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4 and delta["usage"]["input_tokens"] == 4


def test_stream_with_the_sdk_accumulator(client):
    whole = client.messages.create(model=ECHO, max_tokens=64, messages=USER)
    with client.messages.stream(model=ECHO, max_tokens=64, messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "one two three four"
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_stream_stop_sequence_and_max_tokens(client):
    with client.messages.stream(model=ECHO, max_tokens=64, messages=USER, stop_sequences=["four"]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "four"
    with client.messages.stream(model=ECHO, max_tokens=1, messages=USER) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.content[0].text == "one"


def test_stream_failure_midway_is_an_error_event(server, client):
    events = raw_events(server, {"model": "test/fails", "max_tokens": 64, "messages": USER})
    name, data = events[-1]
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "api_error", "message": "the scripted model failed midway"}}
    assert [n for n, _ in events].count("content_block_delta") == 2
    with pytest.raises(anthropic.APIStatusError, match="failed midway"):
        with client.messages.stream(model="test/fails", max_tokens=64, messages=USER) as stream:
            stream.get_final_message()


# --- tools -----------------------------------------------------------------------------


def test_tool_use_and_tool_result_round_trip(client):
    message = client.messages.create(
        model=SCRIPT, max_tokens=64, tools=[WEATHER, CLOCK], tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "weather in Paris"}])
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"text": "weather in Paris"}
    sent = last_request()
    assert [t["function"]["name"] for t in sent.tools] == ["get_weather", "get_time"]
    assert sent.tools[0]["function"]["parameters"] == WEATHER["input_schema"]
    assert sent.tool_choice == {"type": "function", "function": {"name": "get_weather"}}

    answer = client.messages.create(model=SCRIPT, max_tokens=64, tools=[WEATHER], messages=[
        {"role": "user", "content": "weather in Paris"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"},
                                     {"type": "text", "text": "so what is it like"}]},
    ])
    assert answer.stop_reason == "end_turn" and answer.content[0].text == "so what is it like"
    roles = [(m.role, m.text) for m in last_request().messages]
    assert roles == [("user", "weather in Paris"), ("assistant", "Let me look."), ("tool", "sunny, 21 C"),
                     ("user", "so what is it like")]
    assistant, tool = last_request().messages[1:3]
    assert assistant.tool_calls[0].id == use.id and json.loads(assistant.tool_calls[0].arguments) == use.input
    assert tool.tool_call_id == use.id


def test_tool_choice_kinds(client):
    client.messages.create(model=SCRIPT, max_tokens=8, tools=[WEATHER], tool_choice={"type": "any"}, messages=USER)
    assert last_request().tool_choice == "required"
    client.messages.create(model=SCRIPT, max_tokens=8, tools=[WEATHER], tool_choice={"type": "auto"}, messages=USER)
    assert last_request().tool_choice == "auto"
    message = client.messages.create(model=SCRIPT, max_tokens=8, tools=[WEATHER], tool_choice={"type": "none"},
                                     messages=USER)
    assert last_request().tool_choice == "none" and message.stop_reason == "end_turn"
    with pytest.raises(anthropic.BadRequestError, match="not in tools"):
        client.messages.create(model=SCRIPT, max_tokens=8, tools=[WEATHER], messages=USER,
                               tool_choice={"type": "tool", "name": "nope"})


def test_tool_result_error_and_images(client):
    data = base64.b64encode(png()).decode()
    client.messages.create(model=SCRIPT, max_tokens=8, messages=[
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                                      "content": [{"type": "text", "text": "partly failed"},
                                                  {"type": "image", "source": {"type": "base64",
                                                   "media_type": "image/png", "data": data}}]}]},
    ])
    messages = last_request().messages
    assert (messages[2].role, messages[2].content) == ("tool", "Error: partly failed")
    assert messages[3].role == "user" and len(messages[3].images) == 1


def test_disable_parallel_tool_use_keeps_one_call(client):
    both = client.messages.create(model="test/two-calls", max_tokens=8, tools=[WEATHER, CLOCK], messages=USER)
    assert [b.name for b in both.content if b.type == "tool_use"] == ["get_weather", "get_time"]
    one = client.messages.create(model="test/two-calls", max_tokens=8, tools=[WEATHER, CLOCK], messages=USER,
                                 tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.name for b in one.content if b.type == "tool_use"] == ["get_weather"]
    with client.messages.stream(model="test/two-calls", max_tokens=8, tools=[WEATHER, CLOCK], messages=USER,
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [("get_weather", {"n": 0})]
    assert final.stop_reason == "tool_use"


def test_stream_tool_use_blocks(server, client):
    events = raw_events(server, {"model": "test/two-calls", "max_tokens": 8, "tools": [WEATHER, CLOCK],
                                 "messages": USER})
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [(b["type"], b["name"], b["input"]) for b in starts] == [("tool_use", "get_weather", {}),
                                                                    ("tool_use", "get_time", {})]
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas == [{"type": "input_json_delta", "partial_json": '{"n":0}'},
                      {"type": "input_json_delta", "partial_json": '{"n":1}'}]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_server_side_tools_are_skipped(client):
    client.messages.create(model=SCRIPT, max_tokens=8, messages=USER, tools=[
        WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "bash_20250124", "name": "bash"}])
    assert [t["function"]["name"] for t in last_request().tools] == ["get_weather"]


# --- images ----------------------------------------------------------------------------


def test_image_base64(client):
    data = base64.b64encode(png()).decode()
    message = client.messages.create(model=SCRIPT, max_tokens=64, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "what is it"}]}])
    assert message.content[0].text == "[1 image(s)] what is it"
    (image,) = last_request().messages[0].images
    assert isinstance(image, ImagePart) and image.data == png()


def test_image_url_follows_the_media_policy(client):
    # Remote images are off unless the server allows them: the same refusal as chat's.
    with pytest.raises(anthropic.BadRequestError, match="image URLs are disabled"):
        client.messages.create(model=SCRIPT, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}])
    with pytest.raises(anthropic.BadRequestError, match="decoded"):
        client.messages.create(model=SCRIPT, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGVsbG8="}}]}])


# --- thinking --------------------------------------------------------------------------


def test_thinking_blocks(client):
    message = client.messages.create(model=THINKER, max_tokens=64, messages=USER,
                                     thinking={"type": "enabled", "budget_tokens": 3})
    assert last_request().reasoning == Reasoning(enabled=True, budget=3)
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == "let me think"
    assert isinstance(thinking.signature, str) and thinking.signature
    assert text.text == "one two three four"
    assert message.usage.output_tokens == 7


def test_thinking_stream_with_the_sdk(server, client):
    with client.messages.stream(model=THINKER, max_tokens=64, messages=USER,
                                thinking={"type": "adaptive"}, output_config={"effort": "high"}) as stream:
        final = stream.get_final_message()
    assert last_request().reasoning == Reasoning(enabled=True, effort="high")
    assert final.content[0].type == "thinking" and final.content[0].thinking == "let me think about this"
    assert final.content[0].signature
    assert final.content[1].text == "one two three four"
    events = raw_events(server, {"model": THINKER, "max_tokens": 64, "messages": USER})
    deltas = [d["delta"]["type"] for n, d in events if n == "content_block_delta"]
    assert deltas == ["thinking_delta"] * 5 + ["signature_delta"] + ["text_delta"] * 4
    assert [d["index"] for n, d in events if n == "content_block_stop"] == [0, 1]


def test_thinking_display_omitted_and_disabled(server, client):
    message = client.messages.create(model=THINKER, max_tokens=64, messages=USER,
                                     thinking={"type": "enabled", "budget_tokens": 2000, "display": "omitted"})
    assert message.content[0].type == "thinking" and message.content[0].thinking == ""
    assert message.content[0].signature
    events = raw_events(server, {"model": THINKER, "max_tokens": 64, "messages": USER,
                                 "thinking": {"type": "enabled", "budget_tokens": 2000, "display": "omitted"}})
    deltas = [d["delta"]["type"] for n, d in events if n == "content_block_delta"]
    assert deltas == ["signature_delta"] + ["text_delta"] * 4
    off = client.messages.create(model=THINKER, max_tokens=64, messages=USER, thinking={"type": "disabled"})
    assert last_request().reasoning.enabled is False
    assert [b.type for b in off.content] == ["text"]


def test_thinking_blocks_sent_back_are_accepted(client):
    first = client.messages.create(model=THINKER, max_tokens=64, messages=USER,
                                   thinking={"type": "enabled", "budget_tokens": 1024})
    client.messages.create(model=THINKER, max_tokens=64, thinking={"type": "enabled", "budget_tokens": 1024},
                           messages=[*USER, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                                     {"role": "user", "content": "again"}])
    assert [m.text for m in last_request().messages] == ["one two three four", "one two three four", "again"]


def test_thinking_enabled_needs_a_budget(client):
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        client.messages.create(model=THINKER, max_tokens=64, messages=USER, thinking={"type": "enabled"})


# --- count_tokens ----------------------------------------------------------------------


def test_count_tokens(client):
    count = client.messages.count_tokens(model=ECHO, messages=USER, system="be brief")
    assert count.input_tokens == 6
    assert client.messages.create(model=ECHO, max_tokens=8, messages=USER, system="be brief").usage.input_tokens == 6


def test_count_tokens_unsupported_backend_is_400(home):
    class NoCount(EchoBackend):
        name = "no-count"
        formats = frozenset({"no-count"})

        def count_prompt_tokens(self, request):
            return super(EchoBackend, self).count_prompt_tokens(request)

    manifest = echo_manifest("test/no-count")
    import attrs

    with serve([NoCount], home=home, models=[attrs.evolve(manifest, format="no-count")]) as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key="-", max_retries=0)
        with pytest.raises(anthropic.BadRequestError, match="cannot count prompt tokens") as caught:
            client.messages.count_tokens(model="test/no-count", messages=USER)
        assert caught.value.body["error"]["type"] == "invalid_request_error"


# --- errors ----------------------------------------------------------------------------


def anthropic_error(resp, status, kind):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    assert body["error"]["message"]
    return body["error"]["message"]


def test_errors_in_anthropic_shape(server, client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-agent-model", max_tokens=8, messages=USER)
    message = caught.value.body["error"]["message"]
    assert "test/echo" in message and "--alias" in message
    url = server.base_url + "/v1/messages"
    anthropic_error(httpx.post(url, json={"model": ECHO, "messages": USER}), 400, "invalid_request_error")
    anthropic_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}),
                    400, "invalid_request_error")
    anthropic_error(httpx.post(url, json={"model": ECHO, "max_tokens": 0, "messages": USER}),
                    400, "invalid_request_error")
    anthropic_error(httpx.get(url), 405, "invalid_request_error")
    anthropic_error(httpx.post(url + "/nope", json={}), 404, "not_found_error")
    anthropic_error(httpx.post(url, json={"model": ECHO, "max_tokens": 8, "messages": USER},
                               headers={"host": "evil.example"}), 403, "permission_error")
    # The OpenAI routes keep OpenAI's shape.
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "nope", "messages": USER})
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_api_key_from_x_api_key_or_bearer(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(ECHO)], api_key="sekrit") as server:
        good = anthropic.Anthropic(base_url=server.base_url, api_key="sekrit", max_retries=0)
        assert good.messages.create(model=ECHO, max_tokens=8, messages=USER).content[0].text
        bad = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model=ECHO, max_tokens=8, messages=USER)
        anthropic_error(httpx.post(server.base_url + "/v1/messages", json={}), 401, "authentication_error")
        bearer = anthropic.Anthropic(base_url=server.base_url, auth_token="sekrit", max_retries=0)
        assert bearer.messages.create(model=ECHO, max_tokens=8, messages=USER).content[0].text
        # Every route takes either header.
        for headers in ({"x-api-key": "sekrit"}, {"authorization": "Bearer sekrit"}):
            assert httpx.get(server.base_url + "/v1/models", headers=headers).status_code == 200
        assert httpx.get(server.base_url + "/v1/models", headers={"x-api-key": "nope"}).status_code == 401
        oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sekrit", max_retries=0)
        assert oai.chat.completions.create(model=ECHO, messages=USER).choices[0].message.content


def test_body_too_large_is_request_too_large(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(ECHO)], max_body_bytes=4096) as server:
        r = httpx.post(server.base_url + "/v1/messages", json={
            "model": ECHO, "max_tokens": 8, "messages": [{"role": "user", "content": "word " * 2000}]})
        anthropic_error(r, 413, "request_too_large")


def test_full_queue_is_overloaded_529(home):
    slow = echo_manifest("test/slow", delay=0.5)
    with serve([EchoBackend], home=home, models=[slow], queue_size=1, parallel=1) as server:
        url = server.base_url + "/v1/messages"
        body = {"model": "test/slow", "max_tokens": 64, "stream": True,
                "messages": [{"role": "user", "content": "a b c d e f g h i j " * 10}]}
        with httpx.stream("POST", url, json=body, timeout=30) as busy:
            assert busy.status_code == 200
            lines = busy.iter_lines()  # kept: a dropped line iterator closes the stream
            next(lines)  # the one slot is taken (for 30 s, or until this stream closes)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                short = {**body, "stream": False, "messages": USER}
                waiting = pool.submit(httpx.post, url, json=short, timeout=60)
                (entry,) = server.app.state.manager.loaded()
                while entry.waiting < 1 and not waiting.done():  # the one queue place is taken
                    time.sleep(0.01)
                r = httpx.post(url, json=short, timeout=30)
                anthropic_error(r, 529, "overloaded_error")
                assert int(r.headers["retry-after"]) >= 1
                client = anthropic.Anthropic(base_url=server.base_url, api_key="-", max_retries=0)
                with pytest.raises(anthropic.OverloadedError):
                    client.messages.create(model="test/slow", max_tokens=8, messages=USER)
                busy.close()  # frees the slot: the waiting request runs
                assert waiting.result().status_code == 200


# --- aliases ---------------------------------------------------------------------------


def test_aliases_map_vendor_model_ids(home):
    aliases = {"claude-haiku-4-5": "test/scripted", "*": ECHO}
    with scripted_server(home, aliases=aliases) as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key="-", max_retries=0)
        message = client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=USER)
        assert message.model == "claude-haiku-4-5" and len(ScriptedEcho.requests) == 1
        assert client.messages.create(model="claude-opus-4-1", max_tokens=8, messages=USER).content[0].text
        assert len(ScriptedEcho.requests) == 1  # the catch-all went to the echo model
        oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        assert oai.chat.completions.create(model="gpt-5-codex", messages=USER).choices[0].message.content
        assert oai.models.retrieve("claude-haiku-4-5").id == "test/scripted"
