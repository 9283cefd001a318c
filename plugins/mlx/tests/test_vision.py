"""The MLX vision backend (mlx-vlm) on a tiny random Qwen2-VL model, driven directly."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from tiny_model import variant
from tiny_vision import png

import nexa_mlx.plugin
from nexa.backend import CancelToken, LoadOptions
from nexa.errors import BadRequest, Cancelled, ContextLengthExceeded, NoBackend
from nexa.plugins import load_plugins
from nexa.registry import BackendRegistry
from nexa.store import ModelStore
from nexa.types import ChatMessage, ChatRequest, Device, ImagePart, Task, TextPart
from nexa_mlx.backend import APPLE_SILICON, MlxBackend
from nexa_mlx.vision import MlxVisionBackend

RED = png(64, 64, (255, 0, 0))
BLUE = png(64, 64, (0, 0, 255))
TALL = png(64, 128, (0, 0, 255))


def look(*images: bytes, text: str = "What is this?") -> tuple[ChatMessage, ...]:
    parts = (TextPart(text), *(ImagePart(image) for image in images))
    return (ChatMessage("user", parts),)


def ask(backend, *images: bytes, cancel: CancelToken | None = None, **fields):
    fields.setdefault("messages", look(*images))
    fields.setdefault("temperature", 0.0)
    return list(backend.chat(ChatRequest.create(**fields), cancel or CancelToken()))


def content(chunks) -> str:
    return "".join(c.content for c in chunks)


def registry() -> BackendRegistry:
    plugins = load_plugins(load_entry_points=False, extra_plugins=[nexa_mlx.plugin])
    assert not plugins.failures
    return BackendRegistry(plugins)


# --- the model in the store, and selection ---------------------------------------------


def test_imported_vision_folder_is_an_mlx_vlm_model(vision_manifest):
    assert vision_manifest.format == "mlx"
    assert vision_manifest.tasks == {Task.CHAT, Task.VLM}
    assert vision_manifest.context_length == 512
    roles = {f.path: f.role for f in vision_manifest.files}
    assert roles["preprocessor_config.json"] == "config"
    assert roles["model.safetensors"] == "weights"


def test_a_pulled_mlx_vision_repo_routes_to_mlx_vlm_and_answers(vision_folder, tmp_path, device):
    from nexa.hub import pull
    from nexa.testing.hubserver import HubServer

    repo = "mlx-community/Tiny-Qwen2-VL-4bit"
    files = {f.name: f.read_bytes() for f in vision_folder.iterdir()}
    store = ModelStore(tmp_path / "home")
    with HubServer({repo: {**files, "README.md": b"# tiny"}}) as hub:
        manifest = pull(store, repo, endpoint=hub.url)
    assert manifest.format == "mlx" and manifest.tasks == {Task.CHAT, Task.VLM}
    assert {f.path for f in manifest.files} == set(files)
    assert registry().select(Task.VLM, manifest, device) is MlxVisionBackend
    model = MlxVisionBackend(manifest, device)
    model.load()
    assert ask(model, RED, max_tokens=2)[-1].usage.completion_tokens == 2


def test_selection_sends_vision_models_to_mlx_vlm_and_text_models_to_mlx_lm(vision_manifest, manifest, device):
    cpu = device  # Metal in the Mac session: there mlx-vlm refuses the cpu device
    assert registry().select(Task.VLM, vision_manifest, cpu) is MlxVisionBackend
    # Text-only requests to a vision model use the same loaded model (one per name).
    assert registry().select(Task.CHAT, vision_manifest, cpu) is MlxVisionBackend
    assert registry().select(Task.CHAT, manifest, cpu) is MlxBackend
    with pytest.raises(NoBackend, match="does not declare task 'vlm'"):
        registry().select(Task.VLM, manifest, cpu)
    assert MlxVisionBackend.name == MlxBackend.name == "mlx"
    assert "no vision tower" in MlxVisionBackend.supports(manifest, cpu)


def test_without_mlx_vlm_selection_explains_the_refusal(tiny_folder, tmp_path):
    # A vision model in an environment where mlx-vlm can't be imported (None in
    # sys.modules is how Python marks a module as unimportable).
    folder = variant(tiny_folder, tmp_path / "vlm", vision_config={"model_type": "siglip"})
    ModelStore(tmp_path / "home").import_path(folder, name="mlx-community/tiny-vlm")
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["mlx_vlm"] = None
        import nexa_mlx.plugin
        from nexa.errors import NoBackend
        from nexa.plugins import load_plugins
        from nexa.registry import BackendRegistry
        from nexa.store import ModelStore
        from nexa.types import Device, Task
        from nexa_mlx.backend import APPLE_SILICON, MlxBackend
        vlm = ModelStore({str(tmp_path / "home")!r}).get("mlx-community/tiny-vlm")
        registry = BackendRegistry(load_plugins(load_entry_points=False, extra_plugins=[nexa_mlx.plugin]))
        try:
            registry.select(Task.VLM, vlm, Device("cpu"))
        except NoBackend as exc:
            print(exc.message)
        else:
            raise SystemExit("selected without mlx-vlm")
        # Text chat on the same model falls back to mlx-lm.
        assert registry.select(Task.CHAT, vlm, Device("cpu")) is MlxBackend
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "mlx: images on MLX models need mlx-vlm, which is not installed" in out.stdout


@pytest.mark.skipif(not APPLE_SILICON, reason="the refusal is for Apple Silicon Macs")
def test_on_a_mac_vision_refuses_the_cpu_device(vision_manifest):
    assert "Metal only" in MlxVisionBackend.supports(vision_manifest, Device("cpu"))


def test_metal_is_refused_off_apple_silicon(vision_manifest):
    if APPLE_SILICON:
        assert MlxVisionBackend.supports(vision_manifest, Device("metal")) is None
    else:
        assert "Apple Silicon" in MlxVisionBackend.supports(vision_manifest, Device("metal"))


def test_importing_the_vision_backend_does_not_import_mlx_vlm():
    code = textwrap.dedent(
        """
        import sys
        import nexa_mlx.vision
        from nexa.types import Device
        nexa_mlx.vision.missing_vision_runtime()
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_vlm', 'mlx_lm', 'PIL'))
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- images reach the model -------------------------------------------------------------


def test_image_tokens_are_counted_in_the_prompt(vision_backend):
    text_only = ask(vision_backend, max_tokens=1)[-1].usage.prompt_tokens
    square = ask(vision_backend, RED, max_tokens=1)[-1].usage.prompt_tokens
    tall = ask(vision_backend, TALL, max_tokens=1)[-1].usage.prompt_tokens
    both = ask(vision_backend, RED, TALL, max_tokens=1)[-1].usage.prompt_tokens
    # 64x64 is resized to 56x56: 2x2 merged patches, between vision start/end markers.
    assert square == text_only + 2 + 4
    assert tall > square
    assert both == square + tall - text_only


def test_different_images_give_different_answers(vision_backend):
    red, blue = content(ask(vision_backend, RED, max_tokens=12)), content(ask(vision_backend, BLUE, max_tokens=12))
    assert red != blue
    assert content(ask(vision_backend, RED, max_tokens=12)) == red


def test_image_position_in_the_message_is_kept(vision_backend):
    before = ChatMessage("user", (ImagePart(RED), TextPart("What is this?")))
    after = look(RED)
    assert content(ask(vision_backend, messages=(before,), max_tokens=12)) != content(
        ask(vision_backend, messages=after, max_tokens=12)
    )


def test_text_only_requests_are_served_too(vision_backend):
    chunks = ask(vision_backend, messages=(ChatMessage("user", "Hello world"),), max_tokens=5)
    assert chunks[-1].usage.prompt_tokens == 15  # the same ChatML prompt as the text model
    assert chunks[-1].usage.completion_tokens == 5


# --- generation -------------------------------------------------------------------------


def test_streams_pieces_then_finish_and_usage(vision_backend):
    # mlx-vlm's BPE detokenizer releases text a word at a time (at tokens that start
    # with a space), so the random model's pieces are fewer than its tokens.
    *pieces, last = ask(vision_backend, RED, max_tokens=30)
    assert len(pieces) >= 3 and all(p.content for p in pieces)
    assert all(p.finish_reason is None and p.usage is None for p in pieces)
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 30


def test_stop_string_cuts_the_answer_before_it(vision_backend):
    full = content(ask(vision_backend, RED, max_tokens=30))
    stop = full[6:9]
    chunks = ask(vision_backend, RED, max_tokens=30, stop=[stop])
    assert content(chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens < 30


def test_seed_reproduces_sampling_and_other_seeds_differ(vision_backend):
    a = content(ask(vision_backend, RED, temperature=1.0, seed=7, max_tokens=20))
    b = content(ask(vision_backend, RED, temperature=1.0, seed=7, max_tokens=20))
    c = content(ask(vision_backend, RED, temperature=1.0, seed=8, max_tokens=20))
    assert a == b != c


def test_sampling_filters_and_penalties_reach_generation(vision_backend):
    greedy = content(ask(vision_backend, RED, max_tokens=20))
    assert content(ask(vision_backend, RED, temperature=1.5, seed=3, max_tokens=20)) != greedy
    assert content(ask(vision_backend, RED, temperature=1.5, seed=3, top_k=1, max_tokens=20)) == greedy
    assert content(ask(vision_backend, RED, temperature=1.5, seed=3, top_p=1e-6, max_tokens=20)) == greedy
    assert content(ask(vision_backend, RED, max_tokens=20, repeat_penalty=1.8)) != greedy
    assert content(ask(vision_backend, RED, max_tokens=20, presence_penalty=2.0)) != greedy


def test_end_of_sequence_token_finishes_with_stop(vision_folder, vision_backend, tmp_path, device):
    # Make the token that starts the second word the model says greedily its
    # end-of-sequence token (random bytes don't survive a decode/encode round trip; a
    # token that begins with a space does).
    full = content(ask(vision_backend, RED, max_tokens=10))
    word = full.split(" ")[1]
    eos = vision_backend.tokenizer.encode(" " + word, add_special_tokens=False)[0]
    folder = variant(vision_folder, tmp_path / "eos", eos_token_id=[2, eos])
    manifest = ModelStore(tmp_path / "home").import_path(folder, name="mlx-community/tiny-vl-eos")
    other = MlxVisionBackend(manifest, device)
    other.load()
    chunks = ask(other, RED, max_tokens=10)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens < 10
    # mlx-vlm's detokenizer drops invalid UTF-8 at the end of an answer but shows it as
    # U+FFFD in the middle of one: the random model's bytes differ only there.
    assert content(chunks) == full[: full.index(" " + word)].replace("\ufffd", "")


def test_prompt_longer_than_context_is_a_400(vision_manifest, device):
    small = MlxVisionBackend(vision_manifest, device, LoadOptions(context_length=20))
    small.load()
    with pytest.raises(ContextLengthExceeded):
        ask(small, RED)  # 29 prompt tokens with the image


def test_a_long_prompt_is_prefilled_in_chunks(vision_manifest, device):
    # Longer than one prefill step (512 on CPU): the chunk boundaries carry the cancel check.
    big = MlxVisionBackend(vision_manifest, device, LoadOptions(context_length=2048))
    big.load()
    chunks = ask(big, messages=look(RED, text="the quick brown fox " * 200), max_tokens=3)
    assert chunks[-1].usage.prompt_tokens > 600
    assert chunks[-1].usage.completion_tokens == 3


def test_cancel_stops_within_one_token(vision_backend):
    cancel = CancelToken()
    stream = vision_backend.chat(ChatRequest.create(look(RED), temperature=0.0, max_tokens=200), cancel)
    assert next(stream).content and next(stream).content
    cancel.cancel()
    with pytest.raises(Cancelled):
        next(stream)
    assert ask(vision_backend, RED, max_tokens=3)[-1].usage.completion_tokens == 3


def test_cancel_before_start_does_no_work(vision_backend):
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        ask(vision_backend, RED, cancel=cancel)


# --- refusals ---------------------------------------------------------------------------


def test_bad_requests_are_400s(vision_backend):
    with pytest.raises(BadRequest, match="could not be decoded") as exc:
        ask(vision_backend, b"\x89PNG not really")
    assert exc.value.status == 400 and exc.value.param == "messages"
    with pytest.raises(BadRequest, match="user messages only"):
        ask(vision_backend, messages=(
            ChatMessage("user", "hi"), ChatMessage("assistant", (ImagePart(RED),)),
        ))
    with pytest.raises(BadRequest, match="response_format"):
        ask(vision_backend, RED, response_format={"type": "json_object"})
    # repeat_penalty 0 is refused at the API edge (test_server.py), before any backend.


def test_passes_the_core_chat_conformance_checks(vision_manifest, device):
    from nexa.testing import conformance

    model = MlxVisionBackend(vision_manifest, device)
    asyncio.run(model.start())
    try:
        conformance.check_chat(model)
    finally:
        asyncio.run(model.stop())


# --- tools ------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def tool_vision_backend(vision_folder, tmp_path_factory, device):
    import json

    from test_backend import TOOL_TEMPLATE
    from tiny_vision import VISION_TEMPLATE

    # The vision template plus a Hermes-style tools block and <tool_call> rendering.
    template = TOOL_TEMPLATE.split("{% for message")[0] + VISION_TEMPLATE.replace(
        "{% if message['content'] is string %}",
        "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
        "{% set tool_call = tool_call.function %}<tool_call>{{ tool_call.name }}</tool_call>"
        "{% endfor %}{% elif message['content'] is string %}",
    )
    folder = variant(vision_folder, tmp_path_factory.mktemp("tools") / "tiny-vl-tools")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = ModelStore(tmp_path_factory.mktemp("home")).import_path(folder, name="mlx-community/tiny-vl-tools")
    model = MlxVisionBackend(manifest, device)
    model.load()
    return model


def test_tools_reach_the_template_and_tool_calls_are_parsed(tool_vision_backend):
    from nexa_mlx.text import AnswerParser

    model = tool_vision_backend
    assert model.tool_markers() == ("<tool_call>", "</tool_call>")
    request = ChatRequest.create(look(RED), tools=[WEATHER])
    assert "get_weather" in model.prompt_text(request, model._tools(request))
    none = ChatRequest.create(look(RED), tools=[WEATHER], tool_choice="none")
    assert "get_weather" not in model.prompt_text(none, model._tools(none))
    # A model's tool-call span becomes a tool call; text that isn't one stays content.
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    loop = model.answer_loop(request, CancelToken(), 0, "before", model._tools(request))
    chunks = list(loop._chunks("", text, AnswerParser(tool_start="<tool_call>", tool_end="</tool_call>"), final=True))
    assert chunks[0].content == "Checking."
    (call,) = chunks[1].tool_calls
    assert call.name == "get_weather" and call.arguments == '{"city": "Oslo"}'
    # The whole request runs with tools offered (the random model rarely calls one).
    assert ask(model, RED, tools=[WEATHER], max_tokens=4)[-1].finish_reason in {"length", "stop", "tool_calls"}


# --- thinking ---------------------------------------------------------------------------

# The vision template with Qwen3's thinking switch in the generation prompt.
THINKING_VISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'].split('</think>')[-1] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% if reasoning_effort is defined %}{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_vision_backend(vision_folder, tmp_path_factory, device):
    import json

    folder = variant(vision_folder, tmp_path_factory.mktemp("think") / "tiny-vl-think")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_VISION_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = ModelStore(tmp_path_factory.mktemp("home")).import_path(folder, name="mlx-community/tiny-vl-think")
    model = MlxVisionBackend(manifest, device)
    model.load()
    return model


def test_a_thinking_vision_template_gets_the_switches(thinking_vision_backend):
    from nexa.reasoning import QWEN3
    from nexa.types import Reasoning

    model = thinking_vision_backend
    assert model.think_format == QWEN3
    # mlx-vlm would switch thinking off by default; the template's own default is kept.
    default, position = model.chat_prompt_text(ChatRequest.create(look(RED)), [])
    assert default.endswith("<|im_start|>assistant\n") and position == "before"
    off = ChatRequest.create(look(RED), reasoning=Reasoning(enabled=False))
    text, position = model.chat_prompt_text(off, [])
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and position == "closed"
    # The whole request runs with thinking off, counting no reasoning.
    chunks = ask(model, RED, reasoning=Reasoning(enabled=False), max_tokens=3)
    assert chunks[-1].usage.reasoning_tokens == 0 and chunks[-1].usage.completion_tokens <= 3


def test_vision_backend_returns_logprobs_and_applies_logit_bias(vision_backend):
    chunks = ask(vision_backend, RED, max_tokens=4, logprobs=2)
    records = [r for c in chunks for r in c.logprobs]
    assert len(records) == chunks[-1].usage.completion_tokens
    assert all(len(r.top) == 2 and r.top[0][1] >= r.top[1][1] and r.logprob <= 0 for r in records)
    # Greedy: the chosen token is the most likely one.
    assert all(r.token == r.top[0][0] for r in records)
    first = [c for c in chunks if c.content][0]
    banned = vision_backend.tokenizer.encode(first.content, add_special_tokens=False)[0]
    again = ask(vision_backend, RED, max_tokens=4, logit_bias={banned: -100})
    assert again[0].content != first.content
