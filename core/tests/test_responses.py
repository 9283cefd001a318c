"""OpenAI's Responses API (``/v1/responses``) through the official ``openai`` SDK.

Protocol mechanics only, on declared test doubles (the echo backend and ``ScriptedEcho``
from ``agent_doubles``, which records each translated request and scripts reasoning and
tool calls). Real-model answers through this API: ``tests/test_agents.py``.
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest
from agent_doubles import ECHO, SCRIPT, THINKER, last_request, scripted_server

from nexa.testing import EchoBackend, echo_manifest, serve
from nexa.types import Reasoning

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": False}
HOSTED = [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
          {"type": "code_interpreter", "container": {"type": "auto"}}, {"type": "image_generation"},
          {"type": "mcp", "server_label": "x", "server_url": "https://example.com"}, {"type": "local_shell"}]


@pytest.fixture
def server(home):
    with scripted_server(home) as handle:
        yield handle


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)



def raw_events(server, body, **headers):
    with httpx.stream("POST", server.base_url + "/v1/responses", json={**body, "stream": True},
                      headers=headers, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        text = resp.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        data = json.loads(data_line[6:])
        assert name_line == "event: " + data["type"], block
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# --- text ------------------------------------------------------------------------------


def test_create_text(client):
    response = client.responses.create(model=ECHO, input="one two three four")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.output_text == "one two three four"
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (4, 4, 8)
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_instructions_items_and_sampling_reach_the_backend(client):
    client.responses.create(
        model=SCRIPT, instructions="Be terse.", temperature=0.3, top_p=0.8, max_output_tokens=50_000,
        input=[{"role": "developer", "content": "Use metric units."},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
               {"role": "user", "content": "more"}],
        metadata={"ticket": "42"}, prompt_cache_key="abc", include=["reasoning.encrypted_content"], store=False,
        extra_body={"client_metadata": {"agent": "codex"}, "text": {"verbosity": "low"}},
    )
    request = last_request()
    assert [(m.role, m.text) for m in request.messages] == [
        ("system", "Be terse.\n\nUse metric units."), ("user", "hello"), ("assistant", "hi"), ("user", "more")]
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.max_tokens) == (0.3, 0.8, 50_000)


def test_max_output_tokens_cut_is_incomplete(server, client):
    response = client.responses.create(model=ECHO, input="one two three four", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "one two"
    events = raw_events(server, {"model": ECHO, "input": "one two three four", "max_output_tokens": 2})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert not any(e["type"] == "response.completed" for e in events)


def test_refused_fields_name_themselves(client):
    for field, value in (("background", True), ("conversation", "conv_1"), ("top_logprobs", 3),
                         ("truncation", "auto")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model=ECHO, input="hi", **{field: value})
        assert caught.value.body["param"] == field
    with pytest.raises(openai.BadRequestError, match="input_file"):
        client.responses.create(model=ECHO, input=[{"role": "user", "content": [
            {"type": "input_file", "file_id": "file_1"}]}])
    with pytest.raises(openai.BadRequestError, match="not supported here") as caught:
        client.responses.create(model=ECHO, input=[{"type": "item_reference", "id": "msg_1"}])
    assert caught.value.body["param"] == "input[0].type"


# --- streaming -------------------------------------------------------------------------


def test_stream_event_sequence(server):
    events = raw_events(server, {"model": ECHO, "input": "one two three"})
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(e["logprobs"] == [] and e["output_index"] == 0 and e["content_index"] == 0 for e in deltas)
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in deltas)
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == 3
    assert final["output"][0]["id"] == item_id and final["output"][0]["content"][0]["text"] == "one two three"


def test_stream_with_the_sdk(client):
    with client.responses.stream(model=ECHO, input="one two three four") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "one two three four" == final.output_text
    assert final.status == "completed" and final.usage.total_tokens == 8
    assert client.responses.retrieve(final.id).output_text == final.output_text


# --- tools -----------------------------------------------------------------------------


def test_function_call_and_output_round_trip(client):
    response = client.responses.create(model=SCRIPT, input="weather in Paris", tools=[WEATHER],
                                       tool_choice="required")
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"text": "weather in Paris"} and call.call_id
    sent = last_request()
    assert sent.tool_choice == "required"
    assert sent.tools == ({"type": "function", "function": {"name": "get_weather", "description": "The weather in "
                           "a city", "parameters": WEATHER["parameters"]}},)
    answer = client.responses.create(model=SCRIPT, tools=[WEATHER], previous_response_id=response.id,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny"}, {"role": "user", "content": "and so?"}])
    assert answer.output_text == "and so?"
    messages = last_request().messages
    assert [(m.role, m.text) for m in messages] == [("user", "weather in Paris"), ("assistant", ""),
                                                    ("tool", "sunny"), ("user", "and so?")]
    assert messages[1].tool_calls[0].id == call.call_id and messages[1].tool_calls[0].name == "get_weather"
    assert messages[2].tool_call_id == call.call_id


def test_stateless_function_call_history(client):
    # store: false clients (Codex) resend everything, reasoning items included.
    client.responses.create(model=SCRIPT, store=False, input=[
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "sun"}]},
    ], tools=[WEATHER])
    messages = last_request().messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1].text == "Checking." and [c.id for c in messages[1].tool_calls] == ["c1", "c2"]
    assert [m.text for m in messages[2:]] == ["rain", "sun"]


def test_stream_function_calls(server, client):
    events = raw_events(server, {"model": "test/two-calls", "input": "go", "tools": [WEATHER, {
        **WEATHER, "name": "get_time"}]})
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress"] + [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"] * 2 + ["response.completed"]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [(i["name"], i["arguments"], i["status"]) for i in added] == [("get_weather", "", "in_progress"),
                                                                         ("get_time", "", "in_progress")]
    with client.responses.stream(model="test/two-calls", input="go", tools=[WEATHER], parallel_tool_calls=False
                                 ) as stream:
        final = stream.get_final_response()
    assert [(o.type, o.name, o.arguments) for o in final.output] == [("function_call", "get_weather", '{"n": 0}')]


def test_namespace_tools_are_flattened(client):
    crm = {"type": "namespace", "name": "crm", "description": "The CRM", "tools": [
        {"type": "function", "name": "lookup", "description": "Find a customer", "parameters": {"type": "object"}},
        {"type": "custom", "name": "note", "description": "Write a note",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /[a-z ]+/"}}]}
    response = client.responses.create(model=SCRIPT, input="find Ann", tools=[WEATHER, crm],
                                       tool_choice={"type": "function", "name": "lookup", "namespace": "crm"})
    sent = last_request()
    names = [t["function"]["name"] for t in sent.tools]
    assert names == ["get_weather", "crm__lookup", "crm__note"]
    assert sent.tool_choice == {"type": "function", "function": {"name": "crm__lookup"}}
    assert "start: /[a-z ]+/" in sent.tools[2]["function"]["description"]
    (call,) = response.output
    assert (call.type, call.name, call.namespace) == ("function_call", "lookup", "crm")
    client.responses.create(model=SCRIPT, tools=[crm], input=[
        {"role": "user", "content": "x"},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "namespace": "crm", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "Ann"}])
    assert last_request().messages[1].tool_calls[0].name == "crm__lookup"


def test_custom_tools_are_free_text_calls(client):
    patch = {"type": "custom", "name": "apply_patch", "description": "Apply a patch"}
    response = client.responses.create(model=SCRIPT, input="fix it", tools=[patch], tool_choice="required")
    (call,) = response.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.input == "fix it"
    assert last_request().tools[0]["function"]["parameters"]["required"] == ["input"]
    client.responses.create(model=SCRIPT, tools=[patch], input=[
        {"role": "user", "content": "fix it"},
        {"type": "custom_tool_call", "call_id": call.call_id, "name": "apply_patch", "input": "*** patch"},
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "done"}])
    assistant, tool = last_request().messages[1:]
    assert json.loads(assistant.tool_calls[0].arguments) == {"input": "*** patch"} and tool.text == "done"


def test_hosted_tools_are_skipped_not_refused(client):
    response = client.responses.create(model=SCRIPT, input="hello", tools=[*HOSTED, WEATHER])
    assert response.status == "completed" and response.output_text == "hello"
    assert [t["function"]["name"] for t in last_request().tools] == ["get_weather"]
    with pytest.raises(openai.BadRequestError, match="hosted tools"):
        client.responses.create(model=SCRIPT, input="x", tools=HOSTED, tool_choice={"type": "web_search"})


def test_allowed_tools_choice(client):
    clock = {**WEATHER, "name": "get_time"}
    client.responses.create(model=SCRIPT, input="x", tools=[WEATHER, clock], tool_choice={
        "type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]})
    sent = last_request()
    assert sent.tool_choice == "required" and [t["function"]["name"] for t in sent.tools] == ["get_time"]


def test_json_schema_format(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    client.responses.create(model=SCRIPT, input="x", text={"format": {
        "type": "json_schema", "name": "count", "schema": schema, "strict": True}})
    assert last_request().response_format == {"type": "json_schema", "json_schema": {"name": "count",
                                                                                      "schema": schema}}
    client.responses.create(model=SCRIPT, input="x", text={"format": {"type": "json_object"}})
    assert last_request().response_format == {"type": "json_object"}


# --- reasoning -------------------------------------------------------------------------


def test_reasoning_item(server, client):
    response = client.responses.create(model=THINKER, input="one two", reasoning={"effort": "high",
                                                                                    "summary": "auto"})
    assert last_request().reasoning == Reasoning(enabled=True, effort="high")
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", "let me think about this")]
    assert message.content[0].text == "one two"
    assert response.usage.output_tokens_details.reasoning_tokens == 5
    events = raw_events(server, {"model": THINKER, "input": "one two"})
    kinds = [e["type"] for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert events[2]["item"]["type"] == "reasoning"
    assert events[3]["part"] == {"type": "reasoning_text", "text": ""}
    assert kinds.count("response.reasoning_text.delta") == 5
    done = next(e for e in events if e["type"] == "response.reasoning_text.done")
    assert done["text"] == "let me think about this"
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1]
    with client.responses.stream(model=THINKER, input="one two") as stream:
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message"]
    off = client.responses.create(model=THINKER, input="one two", reasoning={"effort": "none"})
    assert last_request().reasoning.enabled is False and [o.type for o in off.output] == ["message"]


# --- stored responses ------------------------------------------------------------------


def test_retrieve_and_delete(client):
    response = client.responses.create(model=ECHO, input="keep me", metadata={"k": "v"})
    got = client.responses.retrieve(response.id)
    assert got.id == response.id and got.output_text == "keep me" and got.metadata == {"k": "v"}
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    unstored = client.responses.create(model=ECHO, input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError, match="not stored") as caught:
        client.responses.create(model=ECHO, input="x", previous_response_id=unstored.id)
    assert caught.value.body["param"] == "previous_response_id"


def test_previous_response_id_across_a_restart(home):
    with scripted_server(home) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        first = client.responses.create(model=SCRIPT, instructions="Be kind.", input="first turn")
        with client.responses.stream(model=SCRIPT, input="second turn", previous_response_id=first.id) as stream:
            second = stream.get_final_response()
    with scripted_server(home) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        third = client.responses.create(model=SCRIPT, input="third turn", previous_response_id=second.id)
        assert third.output_text == "third turn" and third.previous_response_id == second.id
        # Instructions are not carried over, as in OpenAI's API; the conversation is.
        assert [(m.role, m.text) for m in last_request().messages] == [
            ("user", "first turn"), ("assistant", "first turn"), ("user", "second turn"),
            ("assistant", "second turn"), ("user", "third turn")]
        assert client.responses.retrieve(first.id).output_text == "first turn"


def test_stored_responses_need_the_api_key(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(ECHO)], api_key="k1") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="k1", max_retries=0)
        response = client.responses.create(model=ECHO, input="secret words")
        r = httpx.get(f"{server.base_url}/v1/responses/{response.id}")
        assert r.status_code == 401
        r = httpx.get(f"{server.base_url}/v1/responses/{response.id}", headers={"x-api-key": "k1"})
        assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "secret words"
    # Restarted without a key (or with another one): what was stored under k1 stays unreadable.
    for key in (None, "k2"):
        with serve([EchoBackend], home=home, models=[echo_manifest(ECHO)], api_key=key) as server:
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key or "-", max_retries=0)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(response.id)
            with pytest.raises(openai.BadRequestError):
                client.responses.create(model=ECHO, input="x", previous_response_id=response.id)
    assert oct((home / "responses.db").stat().st_mode & 0o777) == "0o600"


def test_concurrent_requests_are_all_stored(client):
    def one(i: int) -> str:
        return client.responses.create(model=ECHO, input=f"request {i}").id

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(24)))
    assert len(set(ids)) == 24
    for i, response_id in enumerate(ids):
        assert client.responses.retrieve(response_id).output_text == f"request {i}"


def test_the_store_keeps_at_most_responses_max(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(ECHO)], responses_max=3) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        ids = [client.responses.create(model=ECHO, input=f"n {i}").id for i in range(5)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[1])
        assert [client.responses.retrieve(i).output_text for i in ids[2:]] == ["n 2", "n 3", "n 4"]


def test_store_forgets_responses_past_their_age(tmp_path, monkeypatch):
    import asyncio

    from nexa.server import responses_store
    from nexa.server.responses_store import ResponseStore, StoredResponse

    now = [1_000_000.0]
    monkeypatch.setattr(responses_store.time, "time", lambda: now[0])

    async def run():
        store = ResponseStore(tmp_path / "r.db", ttl=60, max_count=100, api_key=None)
        try:
            await store.put(StoredResponse("resp_old", {"id": "resp_old", "output": []}, []))
            now[0] += 30
            await store.put(StoredResponse("resp_new", {"id": "resp_new", "output": []}, [], "resp_old"))
            assert [i for i in await store.history("resp_new")] == []
            now[0] += 31  # resp_old is past 60 s: unreadable, and a chain through it is broken
            assert await store.get("resp_old") is None and await store.get("resp_new") is not None
            with pytest.raises(Exception, match="no longer stored"):
                await store.history("resp_new")
            await store.put(StoredResponse("resp_x", {"id": "resp_x", "output": []}, []))  # prunes
        finally:
            await store.close()
        import sqlite3

        rows = sqlite3.connect(tmp_path / "r.db").execute("SELECT id FROM responses ORDER BY id").fetchall()
        assert rows == [("resp_new",), ("resp_x",)]

    asyncio.run(run())
