"""Continuous batching through the real server: the llama-cpp backend on the engine.

Concurrent streaming clients (the official ``openai`` client) on one loaded model run at
once, each gets the text it gets alone, and usage, stop strings, seeds and JSON output
keep working beside other requests.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import assert_same_answer
from openai import AsyncOpenAI

from nexa.backend import LoadOptions
from nexa.testing import serve
from nexa.types import Device
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.backend import DEFAULT_PARALLEL, LlamaCppBackend

MODEL = "test/tiny-batch"
WORDS = ["hello world", "the cat", "paris", "yes or no", "count", "answer me", "no", "tell a story"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    src = tiny.write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-batch-F32.gguf", seed=5)
    with serve([LlamaCppBackend], home=tmp_path_factory.mktemp("home"), threads=1, parallel=8) as handle:
        handle.store.import_path(src, name=MODEL)
        yield handle


def client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def stream_text(c: AsyncOpenAI, **kw) -> tuple[str, object, float]:
    started = time.monotonic()
    parts, usage = [], None
    stream = await c.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
    return "".join(parts), usage, time.monotonic() - started


def test_backend_batches_by_default_and_parallel_1_is_one_sequence(tmp_path):
    manifest = tiny.write_tiny_llama(tmp_path / "m.gguf")
    from nexa.store import ModelStore

    m = ModelStore(tmp_path / "home").import_path(manifest, name="t/m")
    cpu = Device("cpu")
    assert LlamaCppBackend(m, cpu, LoadOptions(threads=1)).parallel == DEFAULT_PARALLEL
    assert LlamaCppBackend(m, cpu, LoadOptions(parallel=6)).parallel == 6
    for parallel in (DEFAULT_PARALLEL, 1):
        backend = LlamaCppBackend(m, cpu, LoadOptions(threads=1, parallel=parallel))
        backend.load()
        try:
            assert backend.parallel == backend.engine_stats().n_seq == parallel
        finally:
            backend.close()


def test_concurrent_streams_get_their_solo_texts_and_usage(server):
    requests = [
        {"messages": [{"role": "user", "content": w}], "max_tokens": 40, "temperature": 0} for w in WORDS
    ]
    requests[1] |= {"temperature": 0.9, "seed": 11}
    requests[2] |= {"stop": ["a", "e"]}
    requests[3] |= {"response_format": {"type": "json_object"}}

    steps = {}

    async def main():
        c = client(server)
        solo = [await stream_text(c, **r) for r in requests]
        engine = server.app.state.manager.loaded()[0].backend
        steps["before"] = engine.engine_stats().decode_steps
        together = await asyncio.gather(*(stream_text(c, **r) for r in requests))
        steps["after"] = engine.engine_stats().decode_steps
        return solo, together

    solo, together = asyncio.run(main())
    on = server.app.state.manager.device.kind
    for r, (text_s, usage_s, _), (text_t, usage_t, _) in zip(requests, solo, together, strict=True):
        assert usage_t.prompt_tokens == usage_s.prompt_tokens
        if on != "cpu" and r["temperature"] > 0:
            # A seeded draw from a near-flat distribution (a random model) flips with
            # the GPU's last-bit differences between batch shapes; on the CPU it holds.
            continue
        assert_same_answer(text_t, text_s, on)
        if on == "cpu":
            assert usage_t.completion_tokens == usage_s.completion_tokens
    assert not any(s in solo[2][0] for s in ("a", "e"))
    assert isinstance(json.loads(solo[3][0]), dict)
    # They ran at once: fewer decode calls than tokens (one after the other, every token
    # is its own call, plus one per prompt). Counted, not timed: the machine may be busy,
    # and how many calls are saved depends on how the HTTP arrivals spread out.
    generated = sum(usage.completion_tokens for _, usage, _ in together)
    assert steps["after"] - steps["before"] < generated
    backend = server.app.state.manager.loaded()[0].backend
    stats = backend.engine_stats()
    assert stats.requests_finished >= 16 and stats.active_sequences == 0


def test_engine_figures_on_metrics(server):
    import httpx

    c = client(server)
    asyncio.run(stream_text(c, messages=[{"role": "user", "content": "metrics please"}], max_tokens=8))
    backend = next(e.backend for e in server.app.state.manager.loaded() if e.manifest.name == MODEL)
    stats = backend.engine_stats()
    text = httpx.get(server.base_url + "/metrics").text
    labels = f'{{backend="llama-cpp",model="{MODEL}"}}'

    def value(name: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith(name + labels))
        return float(line.split()[-1])

    assert value("nexa_backend_engine_tokens_generated_total") == stats.tokens_generated > 0
    assert value("nexa_backend_engine_prompt_tokens_evaluated_total") == stats.prompt_tokens_evaluated > 0
    assert value("nexa_backend_engine_prompt_tokens_reused_total") == stats.prompt_tokens_reused
    assert value("nexa_backend_engine_requests_finished_total") == stats.requests_finished
    assert value("nexa_backend_engine_active_sequences") == 0
    assert value("nexa_backend_engine_sequences_max") == 8
