"""``POST /v1/rerank``, ``/v2/rerank`` and ``/rerank``: documents ordered by relevance to a query.

The Jina/Cohere shape that vLLM and llama.cpp's server accept (Cohere's v2 client posts
to ``/v2/rerank``). A model that declares the rerank task is scored by its rerank
backend (a cross-encoder); an embedding model ranks by cosine similarity through its
embedding backend (``nexa.rerank.rerank_by_embedding``).
"""

from __future__ import annotations

import asyncio
import math
import uuid

import msgspec
from litestar import Request, post
from litestar.params import JSONBody

from nexa.config import ServerConfig
from nexa.errors import BadRequest, NexaError, NoBackend, UnsupportedTask
from nexa.rerank import ranking, rerank_by_embedding
from nexa.server import schemas as wire
from nexa.server.deps import Config, Manager
from nexa.server.errors import INFERENCE, error_responses
from nexa.server.work import run_on_model
from nexa.types import RerankRequest, RerankResult, Task

PATHS = ["/v1/rerank", "/v2/rerank", "/rerank"]


def rerank_request(body: wire.RerankRequest, config: ServerConfig) -> RerankRequest:
    """The task request for a rerank body, checked against the server's caps."""
    if not body.documents:
        raise BadRequest("documents must hold at least one document", param="documents")
    if len(body.documents) > config.max_rerank_documents:
        raise BadRequest(
            f"documents holds {len(body.documents)} documents; this server ranks at most "
            f"{config.max_rerank_documents} per request",
            param="documents",
        )
    if len(body.query) > config.max_rerank_chars:
        raise BadRequest(f"query is {len(body.query)} characters; the limit is {config.max_rerank_chars}", param="query")
    texts = tuple(d if isinstance(d, str) else d.text for d in body.documents)
    for index, text in enumerate(texts):
        if len(text) > config.max_rerank_chars:
            raise BadRequest(
                f"documents[{index}] is {len(text)} characters; the limit is {config.max_rerank_chars}",
                param="documents",
            )
    return RerankRequest(query=body.query, documents=texts, model=body.model)


async def score(request: Request, manager: Manager, config: Config, spec: RerankRequest) -> RerankResult:
    """Scores from the model's rerank backend, else by cosine through its embedding backend."""
    manifest = await asyncio.to_thread(manager.store.get, spec.model)
    fallback = Task.EMBED in manifest.tasks
    if Task.RERANK in manifest.tasks:
        try:
            return await run_on_model(
                request, manager, config, spec.model, Task.RERANK, lambda backend: backend.run_rerank(spec)
            )
        except NoBackend:
            if not fallback:
                raise
    if not fallback:
        have = ", ".join(sorted(t.value for t in manifest.tasks)) or "none"
        raise UnsupportedTask(
            f"model {manifest.name!r} is neither a reranker nor an embedding model (it serves: {have})", param="model"
        )
    return await run_on_model(
        request, manager, config, spec.model, Task.EMBED, lambda backend: rerank_by_embedding(backend, spec)
    )


@post(PATHS, tags=["rerank"], status_code=200, summary="Rank documents by relevance to a query",
      responses=error_responses(*INFERENCE))
async def rerank(
    data: JSONBody[wire.RerankRequest], request: Request, manager: Manager, config: Config
) -> wire.RerankResponse:
    spec = rerank_request(data, config)
    result = await score(request, manager, config, spec)
    if len(result.scores) != len(spec.documents) or not all(math.isfinite(x) for x in result.scores):
        raise NexaError("the backend returned a wrong number of scores, or scores that are not numbers")
    results = [
        wire.RerankResultItem(
            index=index,
            relevance_score=float(result.scores[index]),
            document=wire.RerankDocument(text=spec.documents[index]) if data.return_documents else msgspec.UNSET,
        )
        for index in ranking(result.scores, data.top_n)
    ]
    return wire.RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=data.model,
        results=results,
        usage=wire.RerankUsage(total_tokens=result.prompt_tokens),
    )
