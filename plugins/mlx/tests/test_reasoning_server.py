"""Thinking models on MLX, over HTTP with the official openai client.

The models are tiny Qwen3s whose greedy output the test scripted (``scripted_model``):
after Qwen3's generation prompt the model writes ``<think> hello world</think> paris``,
after a closed empty thought (thinking switched off) just `` paris``. So every check
here is on known text through the real backend: template, generation, detokenizer,
reasoning split, stops, tool calls, usage, wire.
"""

from __future__ import annotations

import json
import os

import httpx
import openai
import pytest
import scripted_model as sm

from nexa.testing import serve
from nexa_mlx.backend import MlxBackend
from nexa_mlx.vision import MlxVisionBackend

THINKER = "mlx-community/tiny-thinker"
R1 = "mlx-community/tiny-r1"
TOOL_THINKER = "mlx-community/tiny-tool-thinker"
CALLER = "mlx-community/tiny-caller"
HELLO = [{"role": "user", "content": "Hello world"}]
CALL = ['{"name": "get_weather", "arguments": ', '{"city": ', '"Oslo"', "}}"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
DEVICE = "metal" if os.environ.get("NEXA_DEVICE") == "metal" else "cpu"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    return {
        THINKER: sm.write_model(root / "thinker", [
            (sm.THINKING_ON, "<think> hello world</think> paris"),
            (sm.THINKING_OFF, " paris"),
            ("<|fim_middle|>", " quick fox"),
        ], extra_tokens=sm.FIM_TOKENS),
        R1: sm.write_model(root / "r1", [(sm.R1_OPEN, " hello world</think> paris")], template=sm.R1_TEMPLATE),
        # The thought writes a tool call; only the answer may be acted on.
        TOOL_THINKER: sm.write_model(root / "tool-thinker", [
            (sm.THINKING_ON, "<think> hello<tool_call>" + "".join(CALL) + "</tool_call></think> paris"),
        ], extra_tokens=CALL),
        # Calls the tool, again and again (a loop), after a short thought.
        CALLER: sm.write_model(root / "caller", [
            (sm.THINKING_ON, "<think> hello</think><tool_call>" + "".join(CALL) + "</tool_call>\n\n<tool_call>", False),
        ], extra_tokens=CALL),
    }


def start(folders, tmp_path_factory, **config):
    handle = serve([MlxBackend, MlxVisionBackend], home=tmp_path_factory.mktemp("home"), device=DEVICE,
                   backend="mlx", **config)
    server = handle.__enter__()
    for name, folder in folders.items():
        server.store.import_path(folder, name=name)
    return handle, server


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    handle, server = start(folders, tmp_path_factory)
    yield server
    handle.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def ask(client, model=THINKER, **kwargs):
    kwargs.setdefault("messages", HELLO)
    kwargs.setdefault("max_tokens", 32)
    return client.chat.completions.create(model=model, **kwargs)


def streamed(client, model=THINKER, **kwargs):
    kwargs.setdefault("messages", HELLO)
    kwargs.setdefault("max_tokens", 32)
    chunks = list(client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                 **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return content, reasoning, finishes, chunks[-1].usage, chunks


def reasoning_of(answer) -> str | None:
    return (answer.choices[0].message.model_extra or {}).get("reasoning_content")


# --- separation ---------------------------------------------------------------------------


def test_reasoning_is_separated_from_the_answer(client):
    answer = ask(client)
    message = answer.choices[0].message
    assert message.content == "paris"
    assert reasoning_of(answer) == "hello world"
    assert answer.choices[0].finish_reason == "stop"
    # <think>, hello, world, </think>: reasoning; paris: answer.
    assert answer.usage.completion_tokens == 5
    assert answer.usage.completion_tokens_details.reasoning_tokens == 4


def test_streamed_reasoning_comes_in_reasoning_content_deltas(client):
    content, reasoning, finishes, usage, chunks = streamed(client)
    assert (content, reasoning, finishes) == ("paris", "hello world", ["stop"])
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (5, 4)
    # The thought streams as it is written, before the answer.
    kinds = [("r" if (c.choices[0].delta.model_extra or {}).get("reasoning_content") else "c")
             for c in chunks if c.choices and (c.choices[0].delta.content or c.choices[0].delta.model_extra)]
    assert kinds == ["r", "r", "c"]


def test_deepseek_r1_prompt_that_opens_the_thought(client):
    answer = ask(client, R1)
    assert (answer.choices[0].message.content, reasoning_of(answer)) == ("paris", "hello world")
    assert answer.usage.completion_tokens_details.reasoning_tokens == 3
    content, reasoning, _, _, _ = streamed(client, R1)
    assert (content, reasoning) == ("paris", "hello world")


@pytest.mark.parametrize("switch", [
    {"reasoning_effort": "none"},
    {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
    {"extra_body": {"think": False}},
    {"extra_body": {"reasoning_budget": 0}},
], ids=["reasoning_effort", "chat_template_kwargs", "think", "reasoning_budget"])
def test_each_switch_turns_thinking_off(client, switch):
    answer = ask(client, **switch)
    assert answer.choices[0].message.content == "paris"
    assert reasoning_of(answer) is None
    assert (answer.usage.completion_tokens, answer.usage.completion_tokens_details.reasoning_tokens) == (1, 0)
    content, reasoning, finishes, usage, _ = streamed(client, **switch)
    assert (content, reasoning, finishes, usage.completion_tokens) == ("paris", "", ["stop"], 1)


def test_thinking_off_on_a_template_that_cannot_switch_it(client):
    """R1's template ignores enable_thinking: the server closes the thought for it."""
    answer = ask(client, R1, reasoning_effort="none")
    # Left inside the opened thought the model would write " hello world</think> paris";
    # after the closed one ("\n</think>\n\n") it has nothing scripted and ends at once.
    assert (answer.choices[0].message.content, reasoning_of(answer)) == ("", None)
    assert answer.usage.completion_tokens == 0


@pytest.mark.parametrize("effort", ["minimal", "low", "medium", "high", "xhigh", "max"])
def test_every_sdk_effort_turns_thinking_on(client, effort):
    answer = ask(client, reasoning_effort=effort)
    assert (answer.choices[0].message.content, reasoning_of(answer)) == ("paris", "hello world")


def test_contradictory_switches_are_400s(client):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, reasoning_effort="none", extra_body={"think": True})
    assert error.value.body["param"] == "think"
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, reasoning_effort="high", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert error.value.body["param"] == "chat_template_kwargs.enable_thinking"
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, reasoning_effort="high", extra_body={"think": "low"})
    assert error.value.body["param"] == "think"
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert error.value.body["param"] == "chat_template_kwargs.add_generation_prompt"


def test_thinking_that_uses_up_max_tokens_says_so(client):
    answer = ask(client, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == ""
    assert reasoning_of(answer) == "hello world"
    assert (answer.usage.completion_tokens, answer.usage.completion_tokens_details.reasoning_tokens) == (3, 3)
    content, reasoning, finishes, _, _ = streamed(client, max_tokens=3)
    assert (content, reasoning, finishes) == ("", "hello world", ["length"])


def test_a_budget_closes_the_thought_and_the_answer_follows(client):
    answer = ask(client, extra_body={"reasoning_budget": 2})
    assert (answer.choices[0].message.content, reasoning_of(answer)) == ("paris", "hello")
    # <think> hello, then the forced "\n", "</think>" (reasoning) and "\n\n", then paris.
    assert (answer.usage.completion_tokens, answer.usage.completion_tokens_details.reasoning_tokens) == (6, 4)


def test_a_budget_closes_a_thought_the_prompt_opened(client):
    # R1: " hello" (1 reasoning token), then the forced "\n", "</think>", "\n\n", after
    # which the R1 model has nothing scripted and ends.
    answer = ask(client, R1, extra_body={"reasoning_budget": 1})
    assert (answer.choices[0].message.content, reasoning_of(answer)) == ("", "hello")
    assert (answer.usage.completion_tokens, answer.usage.completion_tokens_details.reasoning_tokens) == (4, 3)


def test_request_format_overrides_the_server(client):
    inline = ask(client, extra_body={"reasoning_format": "inline"})
    assert inline.choices[0].message.content == "<think> hello world</think> paris"
    assert reasoning_of(inline) is None
    hidden = ask(client, extra_body={"reasoning_format": "hidden"})
    assert (hidden.choices[0].message.content, reasoning_of(hidden)) == ("paris", None)
    assert hidden.usage.completion_tokens_details.reasoning_tokens == 4
    content, reasoning, _, _, _ = streamed(client, extra_body={"reasoning_format": "inline"})
    assert (content, reasoning) == ("<think> hello world</think> paris", "")


def test_server_settings_and_request_overrides(folders, tmp_path_factory):
    handle, server = start(folders, tmp_path_factory, reasoning_format="inline", reasoning_budget=0)
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        # --reasoning-budget 0: no thinking at all.
        answer = ask(client)
        assert (answer.choices[0].message.content, answer.usage.completion_tokens) == ("paris", 1)
        # A request that turns thinking on overrides it; --reasoning-format inline shows it.
        answer = ask(client, reasoning_effort="high")
        assert answer.choices[0].message.content == "<think> hello world</think> paris"
        answer = ask(client, reasoning_effort="high", extra_body={"reasoning_format": "separate"})
        assert (answer.choices[0].message.content, reasoning_of(answer)) == ("paris", "hello world")
    finally:
        handle.__exit__(None, None, None)


def test_stop_strings_apply_to_the_answer_only(client, server):
    # "world" is in the thought: it neither ends the answer nor is cut from the thought.
    answer = ask(client, stop=["world"])
    assert (answer.choices[0].message.content, reasoning_of(answer)) == ("paris", "hello world")
    answer = ask(client, stop=["ris"])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("pa", "stop")
    # Anthropic's Messages API reports which stop string ended the answer.
    message = httpx.post(server.base_url + "/v1/messages", timeout=60, json={
        "model": THINKER, "max_tokens": 32, "stop_sequences": ["ris"], "messages": HELLO}).json()
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "ris")
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]


# --- tools --------------------------------------------------------------------------------


def test_a_tool_call_inside_the_thought_is_not_a_call(client):
    answer = ask(client, TOOL_THINKER, tools=[WEATHER])
    message = answer.choices[0].message
    assert message.tool_calls is None and answer.choices[0].finish_reason == "stop"
    assert message.content == "paris"
    assert reasoning_of(answer) == "hello<tool_call>" + "".join(CALL) + "</tool_call>"


def test_tool_call_arguments_stream_as_they_are_written(client):
    chunks = list(client.chat.completions.create(model=CALLER, messages=HELLO, tools=[WEATHER], max_tokens=24,
                                                 stream=True, parallel_tool_calls=False))
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    first, *rest = pieces
    assert (first.index, first.function.name, first.type) == (0, "get_weather", "function") and first.id
    # The arguments arrive in the pieces the model wrote them in, without id or name
    # (the last "}" of the model's "}}" closes the call, not its arguments).
    assert [p.function.arguments for p in rest] == ['{"city": ', '"Oslo"', "}"]
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in rest)
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Oslo"}
    # The model goes on calling until max_tokens; the later calls are dropped.
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_parallel_tool_calls_false_gives_at_most_one_call(client):
    several = ask(client, CALLER, tools=[WEATHER], max_tokens=24)
    assert len(several.choices[0].message.tool_calls) >= 2
    one = ask(client, CALLER, tools=[WEATHER], max_tokens=24, parallel_tool_calls=False)
    (call,) = one.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    # Generation runs to its end (the usage is the model's own count); calls after the
    # first are dropped.
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 24
    assert reasoning_of(one) == "hello"


# --- logprobs and logit_bias --------------------------------------------------------------


def test_logprobs_of_the_answer_tokens(client, server):
    answer = ask(client, logprobs=True, top_logprobs=3)
    (record,) = answer.choices[0].logprobs.content
    assert record.token == " paris" and record.bytes == list(b" paris")
    assert -0.01 < record.logprob <= 0
    assert [t.token for t in record.top_logprobs][0] == " paris" and len(record.top_logprobs) == 3
    assert record.top_logprobs[1].logprob < -20
    chunks = list(client.chat.completions.create(model=THINKER, messages=HELLO, max_tokens=32, stream=True,
                                                 logprobs=True, top_logprobs=1))
    streamed_records = [r for c in chunks if c.choices and c.choices[0].logprobs
                        for r in c.choices[0].logprobs.content]
    assert [r.token for r in streamed_records] == [" paris"]
    # Without logprobs the field is null.
    assert ask(client).choices[0].logprobs is None
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": THINKER, "messages": HELLO, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_logit_bias_changes_the_choice(client, server):
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(server.store.get(THINKER).root / "tokenizer.json"))
    paris, world = ids.token_to_id("Ġparis"), ids.token_to_id("Ġworld")
    banned = ask(client, reasoning_effort="none", logit_bias={str(paris): -100}, max_tokens=4)
    assert "paris" not in banned.choices[0].message.content
    forced = ask(client, reasoning_effort="none", logit_bias={str(world): 100}, max_tokens=4)
    assert forced.choices[0].message.content.startswith("world")
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, logit_bias={"99999": 5})
    assert error.value.body["param"] == "logit_bias"


# --- history ------------------------------------------------------------------------------


def test_earlier_reasoning_stays_out_of_the_prompt_as_the_template_says(server, client):
    manager = server.app.state.manager
    ask(client)  # loads the model
    (entry,) = [e for e in manager.loaded() if e.manifest.name == THINKER]
    from nexa.types import ChatMessage, ChatRequest, ToolCall

    backend = entry.backend
    old_turn = ChatRequest.create((
        ChatMessage("user", "Hello world"),
        ChatMessage("assistant", "paris", reasoning="an old thought"),
        ChatMessage("user", "again"),
    ))
    assert "an old thought" not in backend.tokenizer.decode(backend.prompt_tokens(old_turn, []))
    # Within one tool-using turn (after the last user message) Qwen3 keeps it.
    same_turn = ChatRequest.create((
        ChatMessage("user", "Hello world"),
        ChatMessage("assistant", None, reasoning="a thought in this turn",
                    tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    ))
    rendered = backend.tokenizer.decode(backend.prompt_tokens(same_turn, []))
    assert "<think>\na thought in this turn\n</think>" in rendered
    # reasoning_content sent back over HTTP reaches the template the same way.
    answer = ask(client, messages=[
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "paris", "reasoning_content": "an old thought"},
        {"role": "user", "content": "Hello world"},
    ])
    assert answer.choices[0].message.content == "paris"


def test_the_seed_curl_body_keeps_thinking_out_of_content(server):
    body = {"model": THINKER, "messages": [{"role": "user", "content": "Hello! Briefly introduce yourself."}],
            "max_tokens": 64, "temperature": 0.7, "stream": False}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    message = r.json()["choices"][0]["message"]
    assert "<think>" not in message["content"] and message["reasoning_content"] == "hello world"
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4


# --- legacy completions -------------------------------------------------------------------


def test_text_completions_continue_raw_text(client):
    # No template and no reasoning split: " hello" leads on as the thinker's script does.
    done = client.completions.create(model=THINKER, prompt="I say hello", max_tokens=8)
    assert done.choices[0].text == " world</think> paris"
    assert done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == 3
    echo = client.completions.create(model=THINKER, prompt="I say hello", max_tokens=8, echo=True, stop=["</think>"])
    assert echo.choices[0].text == "I say hello world"
    several = client.completions.create(model=THINKER, prompt=["I say hello", "I say hello world"], max_tokens=1)
    assert [c.text for c in several.choices] == [" world", "</think>"] and [c.index for c in several.choices] == [0, 1]
    stream = client.completions.create(model=THINKER, prompt="I say hello", max_tokens=8, stream=True,
                                       logprobs=2)
    events = list(stream)
    assert "".join(e.choices[0].text for e in events if e.choices) == " world</think> paris"
    tokens = [t for e in events if e.choices and e.choices[0].logprobs for t in e.choices[0].logprobs.tokens]
    assert tokens == [" world", "</think>", " paris"]


def test_fill_in_the_middle_with_a_suffix(client):
    done = client.completions.create(model=THINKER, prompt="def f():", suffix="    return x", max_tokens=4)
    assert done.choices[0].text == " quick fox"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=R1, prompt="x", suffix="y", max_tokens=4)
    assert error.value.body["param"] == "suffix"


def test_client_text_is_never_read_as_control_tokens(client, server):
    from tokenizers import Tokenizer

    # "<|im_end|>" (a special token's text) in a completion prompt is plain text: several
    # tokens, not the end-of-turn token.
    done = client.completions.create(model=THINKER, prompt="<|im_end|>", max_tokens=2)
    assert done.usage.prompt_tokens > 1
    # A token array names tokens directly: after "<think>" the model writes " hello".
    think = Tokenizer.from_file(str(server.store.get(THINKER).root / "tokenizer.json")).token_to_id("<think>")
    by_id = client.completions.create(model=THINKER, prompt=[think], max_tokens=1)
    assert (by_id.choices[0].text, by_id.usage.prompt_tokens) == (" hello", 1)


def test_langchain_gets_answers_without_the_thought(server):
    """LangChain's ChatOpenAI does not read reasoning_content: its content must hold the
    answer alone."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=THINKER, base_url=server.base_url + "/v1", api_key="unused", max_tokens=32,
                      max_retries=0)
    assert chat.invoke("Hello world").content == "paris"
    assert "".join(chunk.content for chunk in chat.stream("Hello world")) == "paris"


def test_nexa_run_shows_the_thought_then_the_answer(server):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "nexa.cli", "--home", str(server.store.home), "run", THINKER, "--backend", "mlx",
         "--device", DEVICE, "--temperature", "0"],
        input="Hello world\n", capture_output=True, text=True, timeout=300, check=True,
    )
    assert done.stdout.splitlines()[:2] == ["hello world", "paris"]


def test_streamed_call_pieces_reach_the_agent_apis_whole(server):
    """Anthropic's Messages API frames whole tool_use blocks: the pieces MLX streams are
    put back together, and disable_parallel_tool_use keeps one call."""
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    body = {"model": CALLER, "max_tokens": 24, "messages": HELLO, "tools": tools}
    several = httpx.post(server.base_url + "/v1/messages", timeout=60, json=body).json()
    uses = [b for b in several["content"] if b["type"] == "tool_use"]
    assert len(uses) >= 2 and all(b["input"] == {"city": "Oslo"} for b in uses)
    one = httpx.post(server.base_url + "/v1/messages", timeout=60, json={
        **body, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}).json()
    (use,) = [b for b in one["content"] if b["type"] == "tool_use"]
    assert (use["name"], use["input"]) == ("get_weather", {"city": "Oslo"})


# --- the agent APIs (Messages, Responses) on a thinking model -------------------------------


@pytest.fixture(scope="module")
def claude(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)


def test_messages_thinking_blocks_with_the_anthropic_sdk(claude):
    message = claude.messages.create(model=THINKER, max_tokens=32, messages=HELLO,
                                     thinking={"type": "enabled", "budget_tokens": 1024})
    thinking, text = message.content
    assert (thinking.type, thinking.thinking, text.text) == ("thinking", "hello world", "paris")
    assert isinstance(thinking.signature, str) and thinking.signature
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 5
    # budget_tokens is the reasoning budget: two thinking tokens, then the answer.
    short = claude.messages.create(model=THINKER, max_tokens=32, messages=HELLO,
                                   thinking={"type": "enabled", "budget_tokens": 2})
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in short.content] == [
        ("thinking", "hello"), ("text", "paris")]
    off = claude.messages.create(model=THINKER, max_tokens=32, messages=HELLO, thinking={"type": "disabled"})
    assert [(b.type, b.text) for b in off.content] == [("text", "paris")]


def test_messages_thinking_stream_with_the_sdk_accumulator(claude):
    with claude.messages.stream(model=THINKER, max_tokens=32, messages=HELLO, thinking={"type": "adaptive"},
                                output_config={"effort": "high"}) as stream:
        thoughts = [e.thinking for e in stream if e.type == "thinking"]
        final = stream.get_final_message()
    assert "".join(thoughts) == "hello world"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert (final.content[0].thinking, final.content[1].text) == ("hello world", "paris")
    assert final.content[0].signature
    omitted = claude.messages.create(model=THINKER, max_tokens=32, messages=HELLO,
                                     thinking={"type": "enabled", "budget_tokens": 1024, "display": "omitted"})
    assert (omitted.content[0].type, omitted.content[0].thinking) == ("thinking", "")
    assert omitted.content[0].signature and omitted.content[1].text == "paris"


def test_responses_reasoning_item_with_the_openai_sdk(client):
    response = client.responses.create(model=THINKER, input="Hello world", max_output_tokens=32,
                                       reasoning={"effort": "high"})
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", "hello world")]
    assert response.output_text == "paris" and response.status == "completed"
    assert response.usage.output_tokens_details.reasoning_tokens == 4
    with client.responses.stream(model=THINKER, input="Hello world", max_output_tokens=32) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "hello world"
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == "paris"
    off = client.responses.create(model=THINKER, input="Hello world", max_output_tokens=32,
                                  reasoning={"effort": "none"})
    assert [o.type for o in off.output] == ["message"] and off.output_text == "paris"
