"""Thinking models, log-probabilities, logit bias and legacy completions on llama.cpp, over HTTP.

The chat models are tiny Qwen3 GGUFs whose greedy output the test scripted
(``seed_models.write_scripted_qwen3``): after Qwen3's generation prompt the model writes
``<think> hello world</think> paris``, after a closed empty thought (thinking switched
off) `` rome``. Every check is on known text through the real backend: the GGUF's chat
template, the batching engine, the detokenizer, the reasoning split, budget, stops, tool
calls, usage and the wire. The seed's chat model is pulled through the loopback Hub under
the seed's own name and asked with the seed's own curl body.
"""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest
from conftest import CHAT, pull_from_loopback_hub

from nexa.testing import serve
from nexa_llama_cpp import plugin
from nexa_llama_cpp import seed_models as sm
from nexa_llama_cpp.testing import png_bytes

SEED = "NexaAI/Qwen3-0.6B-GGUF"
R1 = "test/tiny-r1"
TOOL_THINKER = "test/tiny-tool-thinker"
CONTROL_THINKER = "test/tiny-control-thinker"
CALLER = "test/tiny-caller"
VISION_THINKER = "test/tiny-vision-thinker"
# The seed's first chat command, byte for byte (README: `nexa serve`, then this curl).
SEED_CURL_BODY = ('{"model": "NexaAI/Qwen3-0.6B-GGUF", "messages": [{"role": "user", "content": "Hello!"}], '
                  '"max_tokens": 64}')
HELLO = [{"role": "user", "content": "Hello!"}]
CALL = ' {"name": "get_weather", "arguments": {"city": "Oslo"}} '
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

THINKER_SCRIPTS = [
    (sm.THINKING_ON, sm.pieces("<think> hello world</think> paris")),
    (sm.THINKING_OFF, sm.pieces(" rome")),
    ("<|fim_middle|>", sm.pieces(" return a")),
    ("?", sm.pieces(" upon the time")),
]


def token_id(scripts, text: str) -> int:
    """A piece's token id in the scripted model's vocabulary (the writer's own order)."""
    tokens, _, _ = sm.qwen_vocab([p for start, script, *_ in scripts for p in (start, *script)])
    return tokens.index(text.replace(" ", "\u2581"))


def vision_thinker(folder):
    sm.write_scripted_qwen3(folder / "thinker-F32.gguf", THINKER_SCRIPTS, mmproj=folder / "mmproj-thinker-F32.gguf")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_sources, device):
    src = tmp_path_factory.mktemp("thinkers")
    thinker = sm.write_scripted_qwen3(src / "Qwen3-0.6B-Q8_0.gguf", THINKER_SCRIPTS)
    others = {
        R1: sm.write_scripted_qwen3(src / "tiny-r1-F32.gguf", [(sm.THINKING_ON, sm.pieces(" hello world</think> paris")),
                                                               (sm.THINKING_OFF, sm.pieces(" rome"))],
                                    template=sm.DEEPSEEK_R1_TEMPLATE),
        # The thought writes a tool call; only the answer may be acted on.
        TOOL_THINKER: sm.write_scripted_qwen3(
            src / "tiny-tool-thinker-F32.gguf",
            [(sm.THINKING_ON, ["<think>", "<tool_call>", *sm.pieces(CALL), "</tool_call>", "</think>", " fine"])],
        ),
        # The markers as control tokens: the backend shows their text to find the thought.
        CONTROL_THINKER: sm.write_scripted_qwen3(src / "tiny-control-thinker-F32.gguf", THINKER_SCRIPTS,
                                                 control_think=True),
        # Calls the tool after a short thought.
        CALLER: sm.write_scripted_qwen3(
            src / "tiny-caller-F32.gguf",
            [(sm.THINKING_ON, ["<think>", " hello", "</think>", "<tool_call>", *sm.pieces(CALL), "</tool_call>"])],
        ),
        # The thinker with an image projector: image chats take the vision path.
        VISION_THINKER: vision_thinker(src / "vision-thinker"),
        CHAT: model_sources[CHAT],  # a llama without FIM tokens or a thinking template
    }
    home = tmp_path_factory.mktemp("reasoning-home")
    pull_from_loopback_hub(home, {SEED: {thinker.name: thinker.read_bytes(), "README.md": b"# Qwen3\n"}})
    with serve(home=home, extra_plugins=[plugin], device=device.kind, threads=1) as handle:
        for name, path in others.items():
            handle.store.import_path(path, name=name)
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def post(server, path, body):
    return httpx.post(server.base_url + path, json=body, timeout=120)


def message(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


# --- the seed's chat model ----------------------------------------------------------------------


def test_the_seed_curl_keeps_the_thought_out_of_the_content(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=SEED_CURL_BODY,
                   headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert msg["content"] == "paris"
    assert msg["reasoning_content"] == "hello world"
    assert body["choices"][0]["finish_reason"] == "stop"
    # <think>, hello, world, </think>: the thought's four tokens; then paris.
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4


@pytest.mark.parametrize("switch", [
    {"reasoning_effort": "none"},
    {"chat_template_kwargs": {"enable_thinking": False}},
    {"think": False},
    {"reasoning_budget": 0},
])
def test_thinking_switched_off_leaves_no_reasoning(server, switch):
    body = json.loads(SEED_CURL_BODY) | switch
    r = post(server, "/v1/chat/completions", body)
    msg = message(r)
    # Qwen3's template closed an empty thought; the model answered at once.
    assert msg["content"] == " rome"
    assert not msg.get("reasoning_content")
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_an_effort_turns_thinking_on(server):
    msg = message(post(server, "/v1/chat/completions", {"model": SEED, "messages": HELLO, "reasoning_effort": "high"}))
    assert (msg["content"], msg["reasoning_content"]) == ("paris", "hello world")


def test_contradictory_switches_are_a_400(server):
    r = post(server, "/v1/chat/completions", {"model": SEED, "messages": HELLO, "think": True,
                                              "reasoning_effort": "none"})
    assert r.status_code == 400, r.text


def test_the_openai_client_reads_reasoning_content_plain_and_streamed(client):
    answer = client.chat.completions.create(model=SEED, messages=HELLO, max_tokens=64)
    assert answer.choices[0].message.content == "paris"
    assert answer.choices[0].message.model_extra["reasoning_content"] == "hello world"
    content, reasoning, finish = "", "", None
    for chunk in client.chat.completions.create(model=SEED, messages=HELLO, max_tokens=64, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            assert chunk.usage.completion_tokens_details.reasoning_tokens == 4
    assert (content, reasoning, finish) == ("paris", "hello world", "stop")


def test_max_tokens_spent_on_the_thought_says_length_and_returns_it(server):
    body = {"model": SEED, "messages": HELLO, "max_tokens": 2}
    r = post(server, "/v1/chat/completions", body)
    msg = message(r)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert msg["reasoning_content"] == "hello"
    assert not msg["content"]


def test_the_budget_closes_the_thought_and_the_answer_follows(server):
    # <think> and hello are the budget's two tokens; the engine then forces </think>.
    r = post(server, "/v1/chat/completions", {"model": SEED, "messages": HELLO, "reasoning_budget": 2})
    msg = message(r)
    assert msg["reasoning_content"] == "hello"
    assert msg["content"] == "rome"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("fmt", "content", "reasoning"), [
    ("inline", "<think> hello world</think> paris", None),
    ("hidden", "paris", None),
    ("separate", "paris", "hello world"),
])
def test_reasoning_formats(server, fmt, content, reasoning):
    msg = message(post(server, "/v1/chat/completions", {"model": SEED, "messages": HELLO, "reasoning_format": fmt}))
    assert msg["content"] == content
    assert msg.get("reasoning_content") == reasoning


def test_the_server_defaults_apply_and_a_request_overrides_them(tmp_path, server, device):
    with serve(home=server.store.home, extra_plugins=[plugin], device=device.kind, threads=1,
               reasoning_format="hidden", reasoning_budget=0) as other:
        off = message(post(other, "/v1/chat/completions", {"model": SEED, "messages": HELLO}))
        assert (off["content"], off.get("reasoning_content")) == (" rome", None)
        on = message(post(other, "/v1/chat/completions", {"model": SEED, "messages": HELLO, "reasoning_budget": -1,
                                                         "reasoning_format": "separate"}))
        assert (on["content"], on["reasoning_content"]) == ("paris", "hello world")


def test_a_prompt_that_opens_the_thought_deepseek_r1(server):
    msg = message(post(server, "/v1/chat/completions", {"model": R1, "messages": HELLO}))
    assert (msg["content"], msg["reasoning_content"]) == ("paris", "hello world")
    # Its template can't switch thinking off: the server closes the opened thought for it.
    off = message(post(server, "/v1/chat/completions", {"model": R1, "messages": HELLO, "reasoning_effort": "none"}))
    assert (off["content"], off.get("reasoning_content")) == (" rome", None)
    budget = message(post(server, "/v1/chat/completions", {"model": R1, "messages": HELLO, "reasoning_budget": 1}))
    assert (budget["content"], budget["reasoning_content"]) == ("rome", "hello")


@pytest.mark.parametrize("stream", [False, True])
def test_thought_markers_that_are_control_tokens(client, stream):
    if not stream:
        answer = client.chat.completions.create(model=CONTROL_THINKER, messages=HELLO, logprobs=True)
        msg = answer.choices[0].message
        assert (msg.content, msg.model_extra["reasoning_content"]) == ("paris", "hello world")
        assert [r.token for r in answer.choices[0].logprobs.content] == [" paris"]
        off = client.chat.completions.create(model=CONTROL_THINKER, messages=HELLO, reasoning_effort="none")
        assert off.choices[0].message.content == " rome"
        return
    content = reasoning = ""
    for chunk in client.chat.completions.create(model=CONTROL_THINKER, messages=HELLO, stream=True):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
    assert (content, reasoning) == ("paris", "hello world")


def test_image_chats_think_the_same_way(server):
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    look = [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    r = post(server, "/v1/chat/completions", {"model": VISION_THINKER, "messages": look, "logprobs": True})
    msg = message(r)
    assert (msg["content"], msg["reasoning_content"]) == ("paris", "hello world")
    assert [t["token"] for t in r.json()["choices"][0]["logprobs"]["content"]] == [" paris"]
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    off = message(post(server, "/v1/chat/completions", {"model": VISION_THINKER, "messages": look,
                                                        "chat_template_kwargs": {"enable_thinking": False}}))
    assert (off["content"], off.get("reasoning_content")) == (" rome", None)
    # The budget is forced on the image path too (its Sampler's steer).
    budget = message(post(server, "/v1/chat/completions", {"model": VISION_THINKER, "messages": look,
                                                           "reasoning_budget": 2}))
    assert (budget["content"], budget["reasoning_content"]) == ("rome", "hello")


def test_a_tool_call_inside_the_thought_is_not_made(server):
    r = post(server, "/v1/chat/completions", {"model": TOOL_THINKER, "messages": HELLO, "tools": [WEATHER]})
    msg = message(r)
    assert msg["content"] == "fine"
    assert not msg.get("tool_calls")
    assert "<tool_call>" in msg["reasoning_content"] and "get_weather" in msg["reasoning_content"]
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_tool_call_arguments_stream_to_the_openai_client(client):
    deltas, reasoning, finish = [], "", None
    for chunk in client.chat.completions.create(model=CALLER, messages=HELLO, tools=[WEATHER], stream=True):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            finish = chunk.choices[0].finish_reason or finish
    assert reasoning == "hello" and finish == "tool_calls"
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    # The arguments came in several deltas of the one call, as the model wrote them.
    fragments = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(fragments) >= 2 and {d.index for d in deltas} == {0}
    assert json.loads("".join(fragments)) == {"city": "Oslo"}


def test_earlier_thoughts_stay_out_of_the_prompt_where_the_template_says(server):
    def prompt_tokens(messages):
        r = post(server, "/v1/chat/completions", {"model": SEED, "messages": messages, "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    thought = "a long thought about the capital of france " * 4
    earlier = [*HELLO, {"role": "assistant", "content": "paris"}, {"role": "user", "content": "And Italy?"}]
    with_thought = [*HELLO, {"role": "assistant", "content": "paris", "reasoning_content": thought},
                    {"role": "user", "content": "And Italy?"}]
    # Qwen3's template drops the thoughts of turns before the last user message...
    assert prompt_tokens(with_thought) == prompt_tokens(earlier)
    # ...and keeps the current turn's (a tool round after the last user message).
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    tool_turn = [*HELLO, {"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    tool_turn_thought = [*HELLO, {"role": "assistant", "content": "", "reasoning_content": thought,
                                  "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert prompt_tokens(tool_turn_thought) > prompt_tokens(tool_turn) + 10


def test_langchain_gets_answers_without_the_thought(server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=server.base_url + "/v1", api_key="none", model=SEED, max_retries=0)
    assert chat.invoke("Hello!").content == "paris"
    assert "".join(str(c.content) for c in chat.stream("Hello!")) == "paris"


# --- logprobs and logit_bias ----------------------------------------------------------------------


def test_logprobs_cover_the_answer_tokens_plain_and_streamed(client):
    answer = client.chat.completions.create(model=SEED, messages=HELLO, logprobs=True, top_logprobs=2)
    records = answer.choices[0].logprobs.content
    # The thought's tokens carry none: the answer is one token, " paris", chosen for sure.
    assert [r.token for r in records] == [" paris"]
    assert records[0].logprob > -0.01
    assert len(records[0].top_logprobs) == 2 and records[0].top_logprobs[0].token == " paris"
    assert records[0].top_logprobs[1].logprob < -10
    streamed = []
    for chunk in client.chat.completions.create(model=SEED, messages=HELLO, logprobs=True, top_logprobs=1,
                                                stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
    assert [r.token for r in streamed] == [" paris"]


def test_logit_bias_moves_the_choice_and_the_logprobs(server):
    paris, rome = token_id(THINKER_SCRIPTS, " paris"), token_id(THINKER_SCRIPTS, " rome")
    # After the thought the model means " paris" (a margin of ~60); -100 rules it out and
    # +30 makes " rome" the choice there, while the scripted tokens (~60) still win elsewhere.
    bias = {str(paris): -100, str(rome): 30}
    body = {"model": SEED, "messages": HELLO, "logit_bias": bias, "logprobs": True, "top_logprobs": 2}
    r = post(server, "/v1/chat/completions", body)
    msg = message(r)
    assert (msg["content"], msg["reasoning_content"]) == ("rome", "hello world")
    (record,) = r.json()["choices"][0]["logprobs"]["content"]
    # The logprobs are the biased ones: " rome" is now all but certain, " paris" out of the top.
    assert record["token"] == " rome" and record["logprob"] > -0.01
    assert " paris" not in [t["token"] for t in record["top_logprobs"]]
    forced = post(server, "/v1/chat/completions", {"model": SEED, "messages": HELLO, "max_tokens": 3,
                                                   "logit_bias": {str(paris): 100}, "reasoning_effort": "none"})
    # Thinking off: the model means " rome"; +100 makes it write " paris", again and again.
    assert message(forced)["content"] == " paris paris paris"


def test_a_logit_bias_outside_the_vocabulary_is_a_400(server):
    r = post(server, "/v1/chat/completions", {"model": SEED, "messages": HELLO, "logit_bias": {"999999": 5}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"


# --- /v1/completions ------------------------------------------------------------------------------


def test_completions_continue_raw_text_with_echo_stop_and_logprobs(server):
    r = post(server, "/v1/completions", {"model": SEED, "prompt": "Once?", "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " upon the time"
    echoed = post(server, "/v1/completions", {"model": SEED, "prompt": "Once?", "echo": True, "stop": [" the"]})
    assert echoed.status_code == 200, echoed.text
    assert echoed.json()["choices"][0]["text"] == "Once? upon"
    assert echoed.json()["choices"][0]["finish_reason"] == "stop"
    scored = post(server, "/v1/completions", {"model": SEED, "prompt": "Once?", "logprobs": 2, "max_tokens": 2})
    assert scored.status_code == 200, scored.text
    logprobs = scored.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" upon", " the"]
    assert all(lp > -0.01 for lp in logprobs["token_logprobs"])
    assert [len(top) for top in logprobs["top_logprobs"]] == [2, 2]


def test_completions_stream(client):
    text = "".join(c.choices[0].text for c in client.completions.create(model=SEED, prompt="Once?", stream=True)
                   if c.choices)
    assert text == " upon the time"


def test_fill_in_the_middle_with_the_models_fim_tokens(client):
    answer = client.completions.create(model=SEED, prompt="def f(a):\n", suffix="\n", max_tokens=8)
    assert answer.choices[0].text == " return a"


def test_a_control_tokens_text_in_a_prompt_stays_text(server):
    # Were "<|fim_middle|>" read as the control token, the model would write " return a".
    r = post(server, "/v1/completions", {"model": SEED, "prompt": "x<|fim_middle|>", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 2
    assert "return" not in r.json()["choices"][0]["text"]
    ids = post(server, "/v1/completions", {"model": SEED, "prompt": [token_id(THINKER_SCRIPTS, "<|fim_middle|>")],
                                           "max_tokens": 4})
    # A token array names control tokens on purpose.
    assert ids.json()["choices"][0]["text"] == " return a"


def test_a_suffix_on_a_model_without_fim_tokens_is_a_400(server):
    r = post(server, "/v1/completions", {"model": CHAT, "prompt": "def f(a):", "suffix": "\n"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "suffix"


def test_a_token_outside_the_vocabulary_is_a_400(server):
    r = post(server, "/v1/completions", {"model": SEED, "prompt": [1, 999999]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
