"""Rerank: the CrossEncoder backend on a tiny random cross-encoder written here (mechanics),
and relevance order on the real all-MiniLM-L6-v2 through the core's cosine path, over
HTTP with the official Cohere client (v1 and v2), LangChain's Cohere reranker, and plain
JSON.

No PyPI package carries a real cross-encoder's weights (searched: ms-marco, bge-reranker,
jina-reranker, "cross-encoder"); a real cross-encoder's relevance is left to machines
that have one. The tiny model is random, so its checks are about mechanics: scores equal
sigmoid of the model's own logits, batches, window checks, cancellation.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import cohere
import httpx
import pytest

from nexa.backend import CancelToken
from nexa.errors import Cancelled, ContextLengthExceeded
from nexa.formats import describe_folder
from nexa.testing import conformance, serve
from nexa.types import Device, ModelFile, RerankRequest, Task
from nexa_sentence_transformers.backend import SentenceTransformersBackend
from nexa_sentence_transformers.plugin import MINILM_NAME
from nexa_sentence_transformers.rerank import CrossEncoderBackend

CPU = Device("cpu")
QUERY = "What is the capital city of France?"
DOCUMENTS = [
    "Bananas are a good source of potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market closed higher on Tuesday.",
    "Lyon is a large city in France, known for its food.",
]


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, minilm_folder: Path):
    """A 2-layer random BERT with a one-logit head and MiniLM's tokenizer, as a HF folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1,
                        architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(minilm_folder / name, folder / name)
    files = [ModelFile(p.name, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file()]
    return describe_folder("test/tiny-cross-encoder", folder, files, source="local:test")


@pytest.fixture(scope="session")
def cross_backend(tiny_cross_encoder):
    backend = CrossEncoderBackend(tiny_cross_encoder, CPU)
    asyncio.run(backend.start())
    yield backend
    asyncio.run(backend.stop())


def run(backend, query, documents):
    return asyncio.run(backend.run_rerank(RerankRequest(query, documents)))


def test_a_cross_encoder_folder_is_recognised_as_a_reranker(tiny_cross_encoder) -> None:
    assert tiny_cross_encoder.tasks == {Task.RERANK}
    assert CrossEncoderBackend.supports(tiny_cross_encoder, CPU) is None


def test_scores_are_the_sigmoid_of_the_models_own_logits(cross_backend, tiny_cross_encoder) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = str(tiny_cross_encoder.root)
    model = AutoModelForSequenceClassification.from_pretrained(root).eval()
    tokenizer = AutoTokenizer.from_pretrained(root)
    with torch.inference_mode():
        logits = model(**tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, padding=True, return_tensors="pt")).logits
    expected = [1 / (1 + math.exp(-x)) for x in logits.reshape(-1).tolist()]
    result = run(cross_backend, QUERY, DOCUMENTS)
    assert [round(s, 5) for s in result.scores] == [round(s, 5) for s in expected]
    tokens = tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS)["input_ids"]
    assert result.prompt_tokens == sum(len(t) for t in tokens)


def test_the_tiny_cross_encoder_passes_the_conformance_kit(cross_backend) -> None:
    conformance.check_rerank(cross_backend)


def test_64_documents_take_two_batched_passes_not_64(cross_backend) -> None:
    calls = []
    hook = cross_backend.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        result = run(cross_backend, QUERY, [f"document number {i} about France" for i in range(64)])
    finally:
        hook.remove()
    assert len(result.scores) == 64
    assert len(calls) == 64 // cross_backend.batch_size == 2


def test_a_pair_longer_than_the_window_is_refused(cross_backend) -> None:
    with pytest.raises(ContextLengthExceeded, match=r"documents\[1\]"):
        run(cross_backend, QUERY, ["short", "word " * 200])


def test_a_cancelled_rerank_does_no_work(cross_backend) -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        cross_backend.rerank(RerankRequest(QUERY, DOCUMENTS), token)


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm, tiny_cross_encoder):
    with serve([SentenceTransformersBackend, CrossEncoderBackend], home=tmp_path_factory.mktemp("rerank-home"),
               models=[minilm, tiny_cross_encoder]) as handle:
        yield handle


def test_minilm_ranks_the_answer_first_through_the_embedding_path(server) -> None:
    r = httpx.post(server.base_url + "/v1/rerank", timeout=60, json={
        "model": MINILM_NAME, "query": QUERY, "documents": DOCUMENTS, "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results][:2] == [1, 3], results
    assert results[0]["document"] == {"text": DOCUMENTS[1]}
    assert all(-1.0 <= x["relevance_score"] <= 1.0 for x in results)
    assert r.json()["usage"]["total_tokens"] > 0


def test_cohere_v2_client_reranks_against_nexa(server) -> None:
    client = cohere.ClientV2(base_url=server.base_url, api_key="unused")
    answer = client.rerank(model=MINILM_NAME, query=QUERY, documents=DOCUMENTS, top_n=2)
    assert [r.index for r in answer.results] == [1, 3]
    assert answer.results[0].relevance_score > answer.results[1].relevance_score


def test_cohere_v1_client_reranks_the_cross_encoder(server) -> None:
    client = cohere.Client(base_url=server.base_url, api_key="unused")
    answer = client.rerank(model="test/tiny-cross-encoder", query=QUERY, documents=DOCUMENTS, return_documents=True)
    assert sorted(r.index for r in answer.results) == [0, 1, 2, 3]
    scores = [r.relevance_score for r in answer.results]
    assert scores == sorted(scores, reverse=True) and all(0.0 < s < 1.0 for s in scores)
    assert {r.document.text for r in answer.results} == set(DOCUMENTS)


def test_langchain_cohere_reranker_compresses_documents_through_nexa(server) -> None:
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(model=MINILM_NAME, base_url=server.base_url, cohere_api_key="unused", top_n=2)
    kept = reranker.compress_documents([Document(page_content=d) for d in DOCUMENTS], QUERY)
    assert [d.page_content for d in kept] == [DOCUMENTS[1], DOCUMENTS[3]]
    assert kept[0].metadata["relevance_score"] > kept[1].metadata["relevance_score"]


def test_models_list_shows_which_models_rerank(server) -> None:
    cards = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]}
    assert cards["test/tiny-cross-encoder"]["tasks"] == ["rerank"]
    assert cards[MINILM_NAME]["tasks"] == ["embed", "rerank"]


def test_too_long_document_over_http_is_a_400(server) -> None:
    r = httpx.post(server.base_url + "/v1/rerank", timeout=60, json={
        "model": "test/tiny-cross-encoder", "query": QUERY, "documents": ["fine", "word " * 300]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "documents" and "documents[1]" in error["message"], json.dumps(error)
