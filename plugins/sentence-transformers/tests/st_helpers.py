"""Small shared helpers for the sentence-transformers plugin tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The weather is lovely today.", "It is a really nice day outside."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def paraphrase_margin(vectors: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(lowest paraphrase-pair cosine, highest unrelated-pair cosine) for PARAPHRASES order."""
    pairs = len(PARAPHRASES)
    related = [cosine(vectors[2 * i], vectors[2 * i + 1]) for i in range(pairs)]
    unrelated = [
        cosine(vectors[2 * i + a], vectors[2 * j + b])
        for i in range(pairs)
        for j in range(pairs)
        if i != j
        for a in (0, 1)
        for b in (0, 1)
    ]
    return min(related), max(unrelated)


def flat_texts() -> list[str]:
    return [t for pair in PARAPHRASES for t in pair]
