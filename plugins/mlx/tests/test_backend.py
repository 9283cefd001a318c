"""The MLX backend on a tiny random Qwen2 model, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest
from tiny_model import variant

import nexa_mlx.plugin
from nexa.backend import CancelToken, LoadOptions
from nexa.errors import (
    BadRequest,
    Cancelled,
    ContextLengthExceeded,
    ModelLoadError,
    NoBackend,
    UnsupportedTask,
)
from nexa.plugins import load_plugins
from nexa.registry import BackendRegistry
from nexa.store import ModelStore
from nexa.types import ChatMessage, ChatRequest, Device, ImagePart, Task, TextPart
from nexa_mlx.backend import APPLE_SILICON, MlxBackend

HELLO = (ChatMessage("user", "Hello world"),)


def ask(backend, cancel: CancelToken | None = None, **fields):
    fields.setdefault("messages", HELLO)
    fields.setdefault("temperature", 0.0)
    return list(backend.chat(ChatRequest.create(**fields), cancel or CancelToken()))


def content(chunks) -> str:
    return "".join(c.content for c in chunks)


# --- the model in the store, and selection ---------------------------------------------


def test_imported_folder_is_an_mlx_chat_model(manifest):
    assert manifest.format == "mlx"
    assert manifest.tasks == {Task.CHAT}
    assert manifest.context_length == 512
    assert manifest.file_path("weights").name == "model.safetensors"


def test_selection_picks_mlx_for_mlx_models_and_honours_a_pin(manifest):
    plugins = load_plugins(load_entry_points=False, extra_plugins=[nexa_mlx.plugin])
    assert not plugins.failures
    assert BackendRegistry(plugins).select(Task.CHAT, manifest, Device("cpu")) is MlxBackend
    assert BackendRegistry(plugins, pin="mlx").select(Task.CHAT, manifest, Device("cpu")) is MlxBackend
    with pytest.raises(NoBackend, match="pinned"):
        BackendRegistry(plugins, pin="llama-cpp").select(Task.CHAT, manifest, Device("cpu"))


def test_a_gguf_or_cuda_device_is_not_ours(manifest):
    plugins = load_plugins(load_entry_points=False, extra_plugins=[nexa_mlx.plugin])
    with pytest.raises(NoBackend, match="device 'cuda'"):
        BackendRegistry(plugins).select(Task.CHAT, manifest, Device("cuda"))


@pytest.mark.skipif(APPLE_SILICON, reason="Metal exists here")
def test_metal_is_refused_off_apple_silicon(manifest):
    assert "Apple Silicon" in MlxBackend.supports(manifest, Device("metal"))


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="nexa") if ep.name == "mlx"]
    assert ep.value == "nexa_mlx.plugin"


def test_importing_the_plugin_does_not_import_mlx():
    code = textwrap.dedent(
        """
        import sys
        from nexa.plugins import load_plugins
        import nexa_mlx.plugin, nexa_mlx.backend, nexa_mlx.vision
        plugins = load_plugins(load_entry_points=False, extra_plugins=[nexa_mlx.plugin])
        nexa_mlx.backend.MlxBackend.supports
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'mlx_vlm', 'transformers'))
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_broken_weights_are_a_load_error(tiny_folder, tmp_path, device):
    folder = variant(tiny_folder, tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    manifest = ModelStore(tmp_path / "home").import_path(folder, name="mlx-community/broken")
    with pytest.raises(ModelLoadError, match="broken"):
        MlxBackend(manifest, device).load()


# --- generation -----------------------------------------------------------------------


def test_streams_pieces_then_finish_and_usage(backend):
    chunks = ask(backend, max_tokens=12)
    *pieces, last = chunks
    assert len(pieces) >= 3 and all(p.content for p in pieces)
    assert all(p.finish_reason is None and p.usage is None for p in pieces)
    assert last.finish_reason == "length"
    prompt = backend.prompt_tokens(ChatRequest.create(HELLO), [])
    assert last.usage.prompt_tokens == len(prompt) == 15
    assert last.usage.completion_tokens == 12
    assert content(chunks)


def test_chat_template_renders_chatml(backend):
    request = ChatRequest.create((ChatMessage("system", "Be brief."), *HELLO))
    text = backend.tokenizer.decode(backend.prompt_tokens(request, []))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    )


def test_list_content_is_rendered_as_text(backend):
    parts = ChatRequest.create((ChatMessage("user", (TextPart("Hello "), TextPart("world"))),))
    assert backend.prompt_tokens(parts, []) == backend.prompt_tokens(ChatRequest.create(HELLO), [])


def test_greedy_is_deterministic(backend):
    assert content(ask(backend, max_tokens=20)) == content(ask(backend, max_tokens=20, seed=5))


def test_stop_string_cuts_the_answer_before_it(backend):
    full = content(ask(backend, max_tokens=30))
    # A stop string taken from the middle of what the model says greedily.
    stop = full[8:11]
    expected = full[: full.index(stop)]
    chunks = ask(backend, max_tokens=30, stop=[stop])
    assert content(chunks) == expected
    assert stop not in content(chunks)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens < 30


def test_earliest_of_several_stops_wins(backend):
    full = content(ask(backend, max_tokens=30))
    late, early = full[15:18], full[5:8]
    chunks = ask(backend, max_tokens=30, stop=[late, early])
    assert content(chunks) == full[: full.index(early)]


def test_end_of_sequence_token_finishes_with_stop(tiny_folder, tmp_path, backend, device):
    # Make the third token the model says greedily its end-of-sequence token.
    tokens = backend.tokenizer.encode(content(ask(backend, max_tokens=10)))
    eos = tokens[2]
    assert eos not in tokens[:2]
    folder = variant(tiny_folder, tmp_path / "eos", eos_token_id=[2, eos])
    manifest = ModelStore(tmp_path / "home").import_path(folder, name="mlx-community/tiny-eos")
    other = MlxBackend(manifest, device)
    other.load()
    chunks = ask(other, max_tokens=10)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 2
    assert content(chunks) == backend.tokenizer.decode(tokens[:2])


def test_seed_reproduces_sampling_and_other_seeds_differ(backend):
    a = content(ask(backend, temperature=1.0, seed=7, max_tokens=24))
    b = content(ask(backend, temperature=1.0, seed=7, max_tokens=24))
    c = content(ask(backend, temperature=1.0, seed=8, max_tokens=24))
    unseeded = {content(ask(backend, temperature=1.0, max_tokens=24)) for _ in range(2)}
    assert a == b
    assert a != c
    assert len(unseeded) == 2  # unseeded requests don't replay each other


def test_sampling_filters_reach_the_sampler(backend):
    greedy = content(ask(backend, max_tokens=20))
    sampled = content(ask(backend, temperature=1.5, seed=3, max_tokens=20))
    assert sampled != greedy
    # Each filter, set to keep only the most likely token, turns sampling into greedy.
    assert content(ask(backend, temperature=1.5, seed=3, top_k=1, max_tokens=20)) == greedy
    assert content(ask(backend, temperature=1.5, seed=3, top_p=1e-6, max_tokens=20)) == greedy
    assert content(ask(backend, temperature=1.5, seed=3, min_p=0.999, max_tokens=20)) == greedy


def test_repetition_penalty_changes_a_repetitive_answer(backend):
    greedy = ask(backend, max_tokens=30)
    penalised = ask(backend, max_tokens=30, repeat_penalty=1.8)
    assert content(penalised) != content(greedy)
    assert ask(backend, max_tokens=30, repeat_penalty=1.0) == greedy
    # repeat_penalty 0 is refused at the API edge (test_server.py), before any backend.


def test_presence_and_frequency_penalties_change_the_answer(backend):
    greedy = content(ask(backend, max_tokens=30))
    assert content(ask(backend, max_tokens=30, presence_penalty=2.0)) != greedy
    assert content(ask(backend, max_tokens=30, frequency_penalty=2.0)) != greedy


def test_prompt_longer_than_context_is_a_400(manifest, device):
    small = MlxBackend(manifest, device, LoadOptions(context_length=10))
    small.load()
    with pytest.raises(ContextLengthExceeded) as exc:
        ask(small)
    assert exc.value.status == 400 and exc.value.code == "context_length_exceeded"


def test_without_max_tokens_generation_stops_at_the_context(manifest, device):
    small = MlxBackend(manifest, device, LoadOptions(context_length=20))
    small.load()
    chunks = ask(small)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 20 - 15
    capped = ask(small, max_tokens=100)
    assert capped[-1].usage.completion_tokens == 5


def test_cancel_stops_within_one_token(backend):
    cancel = CancelToken()
    stream = backend.chat(ChatRequest.create(HELLO, temperature=0.0, max_tokens=200), cancel)
    first = [next(stream), next(stream)]
    assert all(c.content for c in first)
    cancel.cancel()
    with pytest.raises(Cancelled):
        next(stream)
    # The model is free again at once.
    assert ask(backend, max_tokens=3)[-1].usage.completion_tokens == 3


def test_cancel_before_start_does_no_work(backend):
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        ask(backend, cancel)


def test_closing_the_async_stream_cancels_the_work(manifest, device):
    async def main() -> tuple[list, list]:
        model = MlxBackend(manifest, device)
        await model.start()
        try:
            stream = model.stream_chat(ChatRequest.create(HELLO, temperature=0.0, max_tokens=400))
            got = [await stream.__anext__() for _ in range(3)]
            await stream.aclose()  # returns once the worker thread has stopped
            after = [c async for c in model.stream_chat(ChatRequest.create(HELLO, max_tokens=4))]
            return got, after
        finally:
            await model.stop()

    got, after = asyncio.run(main())
    assert len(got) == 3
    assert after[-1].usage.completion_tokens == 4


def test_images_and_response_format_are_refused_with_400(backend):
    image = ChatMessage("user", (TextPart("what is this?"), ImagePart(b"\x89PNG...")))
    with pytest.raises(UnsupportedTask):
        ask(backend, messages=(image,))
    with pytest.raises(BadRequest, match="response_format"):
        ask(backend, response_format={"type": "json_object"})
    assert ask(backend, max_tokens=2, response_format={"type": "text"})[-1].finish_reason


# --- tools ------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# A Hermes/Qwen-style template: mlx-lm recognises `<tool_call>` + `tool_call.name` and
# attaches its JSON tool parser.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "{% set tool_call = tool_call.function %}<tool_call>"
    "{\"name\": \"{{ tool_call.name }}\", \"arguments\": "
    "{{ tool_call.arguments | tojson }}}</tool_call>{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tool_backend(tiny_folder, tmp_path_factory, device):
    folder = variant(tiny_folder, tmp_path_factory.mktemp("tools") / "tiny-tools")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = ModelStore(tmp_path_factory.mktemp("home")).import_path(
        folder, name="mlx-community/tiny-tools"
    )
    model = MlxBackend(manifest, device)
    model.load()
    return model


def test_tools_reach_the_template_and_tool_choice_none_drops_them(tool_backend):
    assert tool_backend.tokenizer.has_tool_calling
    request = ChatRequest.create(HELLO, tools=[WEATHER])
    with_tools = tool_backend.tokenizer.decode(tool_backend.prompt_tokens(request, tool_backend._tools(request)))
    assert "get_weather" in with_tools
    none = ChatRequest.create(HELLO, tools=[WEATHER], tool_choice="none")
    assert tool_backend._tools(none) == []
    named = ChatRequest.create(HELLO, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(BadRequest, match="nope"):
        tool_backend._tools(named)


def test_assistant_tool_calls_in_history_render_with_object_arguments(tool_backend):
    from nexa.types import ToolCall

    history = (
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", None, tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    )
    text = tool_backend.tokenizer.decode(tool_backend.prompt_tokens(ChatRequest.create(history), []))
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text


def said(model, text: str, tools: list) -> list:
    """The chunks the answer loop makes of ``text`` written by the model."""
    from nexa.backend import CancelToken
    from nexa_mlx.text import AnswerParser

    request = ChatRequest.create(HELLO, tools=tools)
    loop = model.answer_loop(request, CancelToken(), 0, "before", model._tools(request))
    start, end = loop.tool_markers
    return list(loop._chunks("", text, AnswerParser(tool_start=start, tool_end=end), final=True))


def test_tool_call_spans_become_tool_calls(tool_backend):
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    chunks = said(tool_backend, text, [WEATHER])
    assert chunks[0].content == "Let me check."
    (call,) = chunks[1].tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert call.id.startswith("call_")
    # Text that isn't a valid call is given back as content, not dropped.
    broken = said(tool_backend, "<tool_call>{oops</tool_call>", [WEATHER])
    assert broken[0].content == "<tool_call>{oops</tool_call>"


# --- Metal ------------------------------------------------------------------------------


@pytest.mark.metal
@pytest.mark.skipif(not APPLE_SILICON, reason="needs an Apple Silicon Mac (Metal)")
def test_generates_on_metal(manifest):
    model = MlxBackend(manifest, Device("metal"))
    model.load()
    a = ask(model, temperature=1.0, seed=11, max_tokens=16)
    assert a[-1].usage.completion_tokens == 16
    assert content(a) == content(ask(model, temperature=1.0, seed=11, max_tokens=16))


def test_passes_the_core_chat_conformance_checks(manifest, device):
    from nexa.testing import conformance

    model = MlxBackend(manifest, device)
    asyncio.run(model.start())
    try:
        conformance.check_chat(model)
    finally:
        asyncio.run(model.stop())
