"""Chat mechanics on a tiny random llama: streaming, stop, length, cancel, context,
grammar-forced JSON and tool calls. The weights are random; the checks are not."""

from __future__ import annotations

import asyncio
import json
import threading

import jsonschema
import pytest
from conftest import CHAT

from nexa.backend import CancelToken, LoadOptions
from nexa.errors import BadRequest, Cancelled, ContextLengthExceeded, UnsupportedTask
from nexa.testing import conformance
from nexa.types import ChatMessage, ChatRequest, merge_tool_calls
from nexa_llama_cpp.backend import LlamaCppBackend

HELLO = (ChatMessage("user", "hello world"),)


def run(backend, **kwargs):
    request = ChatRequest.create(kwargs.pop("messages", HELLO), **kwargs)
    chunks = list(backend.chat(request, CancelToken()))
    text = "".join(c.content for c in chunks)
    return text, chunks


def test_conformance(store, device, tiny_options):
    # The core's checks for every chat backend, through the async interface the server uses.
    backend = LlamaCppBackend(store.get(CHAT), device, tiny_options)
    try:
        asyncio.run(backend.start())
        conformance.check_chat(backend)
    finally:
        asyncio.run(backend.stop())


def test_length_and_usage(chat_backend):
    text, chunks = run(chat_backend, max_tokens=12, temperature=0)
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 12
    builder = chat_backend._prompts
    plan = builder.plan(ChatRequest.create(HELLO))
    expected_prompt = len(builder.tokenize(plan.prompt, plan.shielded))
    assert last.usage.prompt_tokens == expected_prompt
    assert all(c.finish_reason is None for c in chunks[:-1])
    # Streamed piece by piece: more than one content chunk.
    assert sum(1 for c in chunks if c.content) > 3


def test_greedy_is_deterministic_and_seed_controls_sampling(chat_backend):
    a, _ = run(chat_backend, max_tokens=16, temperature=0)
    b, _ = run(chat_backend, max_tokens=16, temperature=0)
    assert a == b
    s1, _ = run(chat_backend, max_tokens=24, temperature=1.5, seed=7)
    s2, _ = run(chat_backend, max_tokens=24, temperature=1.5, seed=7)
    s3, _ = run(chat_backend, max_tokens=24, temperature=1.5, seed=8)
    assert s1 == s2 != s3


def test_stop_string_cuts_output(chat_backend):
    full, _ = run(chat_backend, max_tokens=30, temperature=0)
    stop = full[10:13]
    assert stop and full.index(stop) > 0
    text, chunks = run(chat_backend, max_tokens=30, temperature=0, stop=[stop, "never-there"])
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].stop_sequence == stop  # which one ended it (Anthropic's stop_sequence)
    assert chunks[-1].usage.completion_tokens < 30
    _, unstopped = run(chat_backend, max_tokens=30, temperature=0, stop=["never-there"])
    assert unstopped[-1].stop_sequence is None


def test_cancel_stops_within_a_token(chat_backend):
    cancel = CancelToken()
    request = ChatRequest.create(HELLO, max_tokens=500, temperature=0)
    seen = 0
    with pytest.raises(Cancelled):
        for _chunk in chat_backend.chat(request, cancel):
            seen += 1
            if seen == 3:
                cancel.cancel()
    assert seen == 3
    # The model is usable right after, and the lock was released.
    text, chunks = run(chat_backend, max_tokens=4, temperature=0)
    assert chunks[-1].usage.completion_tokens == 4


def test_cancel_from_another_thread_stops_within_a_token(chat_backend):
    # What the server does on a disconnect: another thread sets the token mid-stream.
    # The reader waits at its first chunk until the token is set, so the cancel lands
    # mid-stream however the threads are scheduled (a short answer could end first).
    cancel = CancelToken()
    request = ChatRequest.create(HELLO, max_tokens=100_000, temperature=0)
    first, cancelled = threading.Event(), threading.Event()

    def canceller() -> None:
        first.wait(60)
        cancel.cancel()
        cancelled.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    after_cancel = 0
    try:
        with pytest.raises(Cancelled):
            for _ in chat_backend.chat(request, cancel):
                if not first.is_set():
                    first.set()
                    assert cancelled.wait(60)
                elif cancel.cancelled:
                    after_cancel += 1
    finally:
        first.set()
        thread.join()
    assert after_cancel <= 1


def test_prompt_longer_than_context_is_context_length_exceeded(store, device, tiny_options):
    import attrs

    backend = LlamaCppBackend(store.get(CHAT), device, attrs.evolve(tiny_options, context_length=64))
    backend.load()
    try:
        n_ctx = backend.context_length()  # the engine's context per request
        assert n_ctx == 64
        long = ChatRequest.create((ChatMessage("user", "hello " * 300),), max_tokens=4)
        with pytest.raises(ContextLengthExceeded) as exc:
            run(backend, messages=long.messages, max_tokens=4)
        # How large the prompt was, the limit and why, and how to raise it.
        message = exc.value.message
        n_prompt = backend.count_prompt_tokens(long)
        assert exc.value.status == 400 and n_prompt > n_ctx
        assert f"maximum context length is {n_ctx} tokens (set by --ctx" in message
        assert f"resulted in {n_prompt} tokens" in message
        assert "nexa serve --ctx " in message
        suggested = int(message.split("nexa serve --ctx ")[1].split()[0])
        assert suggested > n_prompt
        # A prompt that fits: max_tokens is capped by the free context, ending in length.
        text, chunks = run(backend, max_tokens=1000, temperature=0)
        assert chunks[-1].finish_reason in ("length", "stop")
        assert chunks[-1].usage.total_tokens <= n_ctx
    finally:
        backend.close()


def test_context_length_defaults_to_the_trained_length(store, device):
    manifest = store.get(CHAT)
    assert LlamaCppBackend(manifest, device).context_length() == manifest.context_length
    assert LlamaCppBackend(manifest, device, LoadOptions(context_length=256)).context_length() == 256


def test_json_schema_response_format_is_enforced(chat_backend):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "integer"},
            "ok": {"type": "boolean"},
            "tag": {"enum": ["a", "b"]},
        },
        "required": ["answer", "ok", "tag"],
        "additionalProperties": False,
    }
    text, chunks = run(
        chat_backend, max_tokens=200, temperature=0.8, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    assert chunks[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_json_object_response_format(chat_backend):
    text, chunks = run(
        chat_backend, max_tokens=300, temperature=0, response_format={"type": "json_object"}
    )
    if chunks[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a random model may ramble inside a string until max_tokens
        assert text.lstrip().startswith("{")


def test_bad_schema_and_unknown_format_are_400(chat_backend):
    with pytest.raises(BadRequest):
        run(chat_backend, max_tokens=4, response_format={"type": "xml"})
    with pytest.raises(BadRequest):
        run(chat_backend, max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"schema": "nope"}})


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}},
            "required": ["unit", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize("fixture", ["chat_backend", "tools_backend"])
def test_named_tool_choice_forces_a_valid_call(fixture, request):
    backend = request.getfixturevalue(fixture)
    text, chunks = run(
        backend, max_tokens=120, temperature=0.7, seed=1, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = merge_tool_calls(c for chunk in chunks for c in chunk.tool_calls)
    assert chunks[-1].finish_reason == "tool_calls"
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])
    assert text.strip() == ""


def test_required_tool_choice_calls_one_of_the_tools(tools_backend):
    _, chunks = run(tools_backend, max_tokens=120, temperature=0, tools=[WEATHER, TIME],
                    tool_choice="required")
    calls = merge_tool_calls(c for chunk in chunks for c in chunk.tool_calls)
    assert len(calls) == 1 and calls[0].name in ("get_weather", "get_time")
    assert chunks[-1].finish_reason == "tool_calls"


def test_tool_choice_without_its_tool_cannot_build_a_grammar(chat_backend):
    # The server refuses these at the edge (nexa.server.convert); a backend called
    # directly still cannot force a call to a tool it was not given.
    with pytest.raises(BadRequest):
        run(chat_backend, max_tokens=4, tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(BadRequest):
        run(chat_backend, max_tokens=4, tool_choice="required")


def test_tools_reach_the_prompt(chat_backend, tools_backend):
    request = ChatRequest.create(HELLO, tools=[WEATHER])
    # A template without tool support gets them in a system prompt we write...
    plain = chat_backend._prompts.plan(request).prompt
    assert plain.startswith("<|im_start|>system\nYou can call functions")
    assert '"name": "get_weather"' in plain
    # ...a tool-aware template renders them itself; tool_choice none leaves them out.
    aware = tools_backend._prompts.plan(request).prompt
    assert "# Tools" in aware and "get_weather" in aware
    none = tools_backend._prompts.plan(ChatRequest.create(HELLO, tools=[WEATHER], tool_choice="none")).prompt
    assert "get_weather" not in none


def test_embedding_model_cannot_chat_and_chat_model_cannot_embed(chat_backend, embed_backend):
    from nexa.types import EmbedRequest

    with pytest.raises(UnsupportedTask):
        run(embed_backend, max_tokens=4)
    with pytest.raises(UnsupportedTask):
        chat_backend.embed(EmbedRequest(inputs=["x"]), CancelToken())


def test_images_on_a_text_model_are_refused(chat_backend):
    from nexa.types import ImagePart, TextPart
    from nexa_llama_cpp.testing import png_bytes

    message = ChatMessage("user", (TextPart("what?"), ImagePart(png_bytes())))
    with pytest.raises(UnsupportedTask):
        run(chat_backend, messages=(message,), max_tokens=4)


def test_the_library_context_is_only_for_tokenizing(store, device, tiny_options):
    import attrs

    for parallel in (1, 2):
        options = attrs.evolve(tiny_options, context_length=1024, parallel=parallel)
        backend = LlamaCppBackend(store.get(CHAT), device, options)
        backend.load()
        try:
            # Every text chat runs on the engine (one sequence with --parallel 1), which
            # holds the KV cache; a second full one in the library would never be used.
            assert backend.engine_stats().n_seq == parallel
            assert backend._llama.n_ctx() == 256
            assert backend.context_length() == 1024
            text, chunks = run(backend, messages=(ChatMessage("user", "hello " * 60),), max_tokens=3)
            assert chunks[-1].usage.prompt_tokens > 256 and chunks[-1].usage.completion_tokens == 3
            assert backend.engine_stats().requests_finished == 1
        finally:
            backend.close()
