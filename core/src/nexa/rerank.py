"""Reranking, task level: ordering scored documents, and reranking with any embedding model.

A cross-encoder backend scores (query, document) pairs itself (``Backend.rerank``). An
embedding model has no such head, but it can still rank: embed the query and the
documents (one batched ``run_embed`` call) and score each document by the cosine
similarity of its vector with the query's. That bi-encoder ranking is weaker than a
cross-encoder's, but every embedding model offers it, through the backend it already has.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from nexa.backend import Backend
from nexa.errors import BadRequest, NexaError
from nexa.types import EmbedRequest, RerankRequest, RerankResult


def sigmoid(logit: float) -> float:
    """A cross-encoder's relevance logit as a 0..1 score (overflow-safe)."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


def ranking(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Document indexes, most relevant first; equal scores keep the client's order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if top_n is None else order[:top_n]


async def rerank_by_embedding(backend: Backend, request: RerankRequest) -> RerankResult:
    """Score documents by cosine similarity with the query, from one batched embedding call.

    The backend returns L2-normalised vectors (its contract), so the cosine is a dot
    product. The query is embedded in the same call as the documents: one pass of
    batches, not one per document.
    """
    inputs = (request.query, *request.documents)
    try:
        result = await backend.run_embed(EmbedRequest(inputs=inputs, model=request.model))
    except BadRequest as exc:
        # The embedding backend numbers the inputs with the query first.
        raise type(exc)(_renumbered(exc.message), param="documents" if exc.param == "input" else exc.param) from exc
    if len(result.vectors) != len(inputs):
        raise NexaError("the embedding backend returned a wrong number of vectors")
    query, *documents = result.vectors
    scores = tuple(max(-1.0, min(1.0, sum(q * d for q, d in zip(query, vector, strict=True)))) for vector in documents)
    return RerankResult(scores=scores, prompt_tokens=result.prompt_tokens)


def _renumbered(message: str) -> str:
    """``input[0]`` is the query and ``input[i]`` document ``i - 1`` in the embedding call."""

    def name(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return "query" if index == 0 else f"documents[{index - 1}]"

    return re.sub(r"input\[(\d+)\]", name, message)
