"""The default context of a chat model and the KV cache's layout (``context_size``): the
trained length within a memory budget, what llama.cpp really allocates per token, and
where the choice shows (the engine's cells, ``nexa show``, ``/v1/models``, the 400)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import attrs
import httpx
import pytest
from conftest import CHAT

from nexa.backend import CancelToken, LoadOptions
from nexa.errors import ContextLengthExceeded
from nexa.formats import read_gguf_metadata
from nexa.testing import serve
from nexa.types import ChatMessage, ChatRequest, Device, Manifest
from nexa_llama_cpp import plugin
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.context_size import AGENT_CONTEXT, KvBudget, KvShape, choose_context
from nexa_llama_cpp.engine.kv_types import KV_TYPES

GIB = 1 << 30
CELL_METADATA = 12
LONG = 32768
"""The trained length of the test's long-context model (Qwen2.5-Coder's)."""


@pytest.fixture(scope="module")
def long_model(store, tmp_path_factory) -> Manifest:
    """A tiny model that says it was trained for 32k tokens (its KV cache is 256 B a token)."""
    path = tiny.write_tiny_llama(tmp_path_factory.mktemp("long") / "long-F32.gguf", context_length=LONG)
    return store.import_path(path, name="test/tiny-long")


def kv_bytes_llama_cpp_stores(path) -> float:
    """Bytes per token of one sequence's KV cache as llama.cpp itself saves it: the
    growth of a sequence's state between two prompt lengths, less the 12 bytes the state
    keeps per cell beside K and V (position, count of sequence ids, the sequence id)."""
    import llama_cpp

    llama = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        tokens = llama.tokenize(b"one two three four five six seven eight nine ten " * 20)[:160]
        sizes = []
        for n in (32, 160):
            llama.reset()
            llama._ctx.kv_cache_clear()
            llama.eval(tokens[:n])
            sizes.append(llama_cpp.llama_state_seq_get_size(llama._ctx.ctx, 0))
        return (sizes[1] - sizes[0]) / 128 - CELL_METADATA
    finally:
        llama.close()


def test_kv_bytes_per_token_from_the_gguf_header_are_what_llama_cpp_stores(store):
    paths = [store.get(CHAT).file_path("weights")]
    smollm2 = plugin.smollm2_manifest()
    if smollm2 is not None:  # a real model: 30 layers, 3 KV heads of 64 (grouped-query attention)
        paths.append(smollm2.file_path("weights"))
    for path in paths:
        shape = KvShape.from_gguf(read_gguf_metadata(path))
        assert shape is not None
        assert shape.bytes_per_token() == kv_bytes_llama_cpp_stores(path), path.name
    if smollm2 is not None:
        assert KvShape.from_gguf(read_gguf_metadata(paths[1])).bytes_per_token() == 30 * 3 * 64 * 2 * 2
        q8_0 = KV_TYPES["q8_0"]  # blocks of 32 values in 34 bytes
        assert KvShape.from_gguf(read_gguf_metadata(paths[1])).bytes_per_token(q8_0, q8_0) == 30 * 3 * 2 * 2 * 34


def test_a_long_trained_model_gets_its_whole_length_per_sequence(long_model, device, tiny_options, caplog):
    backend = LlamaCppBackend(long_model, device, attrs.evolve(tiny_options, parallel=4))
    with caplog.at_level(logging.INFO, logger="nexa_llama_cpp.backend"):
        backend.load()
    try:
        assert backend.context_length() == LONG >= AGENT_CONTEXT
        # The choice and why are printed at load.
        said = [r.getMessage() for r in caplog.records if r.name == "nexa_llama_cpp.backend"]
        assert f"{long_model.name}: context of {LONG} tokens: {backend.context_plan().reason}" in said
        stats = backend.engine_stats()
        assert (stats.n_seq, stats.kv_size) == (4, 4 * LONG)  # every sequence owns a whole context
        plan = backend.context_plan()
        assert plan.length == LONG
        assert plan.reason.startswith(f"the length the model was trained for; 4 sequences x {LONG} tokens")
        # An agent-sized prompt is taken (with room to answer; not run: the figures suffice)...
        def prompt(words: int) -> ChatRequest:
            return ChatRequest.create((ChatMessage("user", "hello " * words),), max_tokens=2)

        per_word = backend.count_prompt_tokens(prompt(1001)) - backend.count_prompt_tokens(prompt(1000))
        agent = prompt((AGENT_CONTEXT + 500) // per_word)
        assert AGENT_CONTEXT < backend.count_prompt_tokens(agent) < LONG
        _plan, job = backend.prepare_text(attrs.evolve(agent, sampling=attrs.evolve(agent.sampling, max_tokens=None)))
        assert len(job.prompt_tokens) == backend.count_prompt_tokens(agent)
        assert job.sampling.max_tokens == LONG - len(job.prompt_tokens)
        # ...and one past the trained length is refused with the figures.
        with pytest.raises(ContextLengthExceeded) as exc:
            list(backend.chat(prompt(LONG // per_word), CancelToken()))
        assert exc.value.message.startswith(f"This model's maximum context length is {LONG} tokens (the length "
                                            "the model was trained for; 4 sequences")
        assert "nexa serve --ctx 3" in exc.value.message and f"trained for {LONG} tokens" in exc.value.message
        assert f"resulted in {backend.count_prompt_tokens(prompt(LONG // per_word))} tokens" in exc.value.message
    finally:
        backend.close()


def test_sequences_share_one_pool_when_their_own_contexts_do_not_fit(long_model, tiny_options):
    # 4 x 32k tokens x 256 B = 32 MiB; a quarter of 64 MiB holds 16 MiB: one pool of 64k
    # tokens, in which one request may still use all 32k.
    small = Device("cpu", "small", 64 << 20)
    backend = LlamaCppBackend(long_model, small, attrs.evolve(tiny_options, parallel=4))
    backend.load()
    try:
        layout = backend.layout()
        assert (layout.n_ctx, layout.unified, layout.kv_cells) == (LONG, True, 2 * LONG)
        assert backend.engine_stats().kv_size == 2 * LONG
        assert "one KV pool of 65536 tokens" in layout.reason and "over the 16.0 MiB budget" in layout.reason
        request = ChatRequest.create((ChatMessage("user", "hello " * 50),), max_tokens=2)
        assert list(backend.chat(request, CancelToken()))[-1].usage.completion_tokens == 2
    finally:
        backend.close()


def budget(memory: int, weights: int = 0) -> KvBudget:
    return KvBudget.of(Device("cpu", "", memory), weights)


def test_the_context_default_counts_the_cache_types(long_model, tiny_options):
    """The same 16 MiB budget holds one pool of 64k tokens of f16 cache (256 B a token),
    and of 32k tokens of f32 (512 B: the tiny model's 16-value heads take no quantized
    type); the bytes per token the choice used are what the loaded engine's cache takes."""
    small = Device("cpu", "small", 64 << 20)
    options = attrs.evolve(tiny_options, parallel=4)
    f16 = LlamaCppBackend(long_model, small, options).layout()
    wide = LlamaCppBackend(long_model, small, attrs.evolve(options, cache_type_k="f32", cache_type_v="f32"))
    f32 = wide.layout()
    assert (f16.unified, f16.kv_cells) == (True, 2 * LONG)
    assert (f32.unified, f32.kv_cells, f32.n_ctx) == (True, LONG, LONG)
    assert f32.bytes_per_token == 2 * f16.bytes_per_token
    wide.load()
    try:
        assert wide.engine_stats().kv_size == LONG
        assert wide.kv_bytes_per_token() == f32.bytes_per_token
    finally:
        wide.close()


def test_a_context_too_large_for_memory_is_capped_but_holds_an_agents_prompt():
    # 128k trained, 128 KiB a token (an 8B model): 16 GiB for one whole context.
    big = dict(trained=131072, override=None, parallel=4, bytes_per_token=128 << 10)
    roomy = choose_context(**big, budget=budget(64 * GIB, 5 * GIB))
    assert (roomy.n_ctx, roomy.unified, roomy.kv_cells) == (131072, True, 131072)  # 16 GiB budget
    capped = choose_context(**big, budget=budget(32 * GIB, 5 * GIB))
    assert (capped.n_ctx, capped.unified, capped.kv_cells) == (65536, True, 65536)  # 8 GiB budget
    assert capped.reason.startswith("capped by memory: the model was trained for 131072 tokens; 65536 is what")
    # A quarter of 6 GiB holds 12k tokens; what the weights leave under 75% holds more:
    # the least an agent's prompt needs.
    floor = choose_context(**big, budget=budget(6 * GIB, 2 * GIB))
    assert floor.n_ctx == AGENT_CONTEXT and "the least an agent's prompt needs" in floor.reason
    # ...but never past what the device has.
    tight = choose_context(**big, budget=budget(4 * GIB, 2 * GIB))
    assert tight.n_ctx == 8192
    # A model trained for less than an agent needs is not stretched.
    assert choose_context(**{**big, "trained": 8192}, budget=budget(64 * GIB)).n_ctx == 8192


def test_the_budget_counts_an_image_chats_own_context():
    # 4 x 8k tokens x 16 KiB = 512 MiB, a quarter of 2 GiB; the image chats' fifth context
    # no longer fits beside them: one pool of what is left.
    args = dict(trained=8192, override=None, parallel=4, bytes_per_token=16 << 10, budget=budget(2 * GIB))
    assert not choose_context(**args).unified
    with_mmproj = choose_context(**args, extra_contexts=1)
    assert (with_mmproj.n_ctx, with_mmproj.unified, with_mmproj.kv_cells) == (8192, True, 3 * 8192)


def test_ctx_overrides_the_length_and_unknowns_are_said():
    args = dict(parallel=4, budget=budget(16 * GIB))
    assert choose_context(trained=8192, override=2048, bytes_per_token=1024, **args).reason.startswith("set by --ctx")
    unknown = choose_context(trained=None, override=None, bytes_per_token=1024, **args)
    assert unknown.n_ctx == 4096 and "does not say" in unknown.reason
    no_shape = choose_context(trained=131072, override=None, bytes_per_token=None, **args)
    assert no_shape.n_ctx == AGENT_CONTEXT and "unknown" in no_shape.reason and not no_shape.unified


def test_nexa_show_tells_the_context_serve_would_give(long_model, store):
    env = dict(os.environ, NEXA_HOME=str(store.home))

    def show(*flags):
        out = subprocess.run([sys.executable, "-m", "nexa.cli", "show", long_model.name, *flags],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out

    served = json.loads(show("--json").stdout)["serve_context"]
    assert served["backend"] == "llama-cpp" and served["length"] == LONG
    assert served["reason"].startswith("the length the model was trained for; 4 sequences")
    one = json.loads(show("--json", "--parallel", "1", "--ctx", "20000").stdout)["serve_context"]
    assert one["length"] == 20000 and one["reason"].startswith("set by --ctx; 1 sequence x 20000 tokens")
    plain = show()
    assert json.loads(plain.stdout)["name"] == long_model.name  # stdout stays the manifest
    assert f"context when served by llama-cpp: {LONG} tokens" in plain.stderr


def test_models_endpoint_shows_the_loaded_context_and_the_400_says_how_to_raise_it(tmp_path, model_sources):
    import openai

    with serve([LlamaCppBackend], home=tmp_path, threads=1) as server:
        server.store.import_path(model_sources[CHAT], name=CHAT)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        assert client.models.retrieve(CHAT).model_extra["context_length"] is None  # not loaded yet
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=CHAT, max_tokens=4,
                                           messages=[{"role": "user", "content": "hello " * 2000}])
        error = exc.value.body
        assert error["code"] == "context_length_exceeded"
        assert error["message"].startswith("This model's maximum context length is 1024 tokens "
                                           "(the length the model was trained for; 4 sequences x 1024 tokens")
        assert "nexa serve --ctx " in error["message"] and "trained for 1024 tokens" in error["message"]
        card = client.models.retrieve(CHAT).model_extra
        assert card["loaded"] and card["context_length"] == 1024
        assert card["context_reason"].startswith("the length the model was trained for; 4 sequences")
        listed = {m.id: m.model_extra for m in client.models.list().data}
        assert listed[CHAT]["context_reason"] == card["context_reason"]
        # The agent routes say the same, each in its own error shape.
        anthropic_error = httpx.post(server.base_url + "/v1/messages", timeout=60, json={
            "model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "hello " * 2000}]})
        assert anthropic_error.status_code == 400
        body = anthropic_error.json()
        assert (body["type"], body["error"]["type"]) == ("error", "invalid_request_error")
        assert "maximum context length is 1024 tokens" in body["error"]["message"]
        assert "nexa serve --ctx " in body["error"]["message"]
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=CHAT, max_output_tokens=4, input="hello " * 2000)
        assert "nexa serve --ctx " in exc.value.body["message"]


def test_ctx_fixes_the_length(store, device):
    backend = LlamaCppBackend(store.get(CHAT), device, LoadOptions(context_length=256, parallel=2))
    assert (backend.context_length(), backend.layout().kv_cells) == (256, 512)
