"""Rerank through the core: the hook, the routes' shape and checks, ordering, the cosine
ranking of embedding models, and how `nexa pull` recognises rerankers.

The echo backend is the declared test double here (its score is the share of the query's
words a document holds); real cross-encoders and embedding models are tested in the
sentence-transformers plugin and tests/.
"""

from __future__ import annotations

import asyncio
import json
import math

import attrs
import httpx
import pytest

from nexa.formats import describe_folder
from nexa.hookspecs import hookimpl
from nexa.plugins import load_plugins
from nexa.rerank import ranking, rerank_by_embedding, sigmoid
from nexa.testing import EchoBackend, conformance, echo_manifest, serve
from nexa.types import Device, EmbedRequest, ModelFile, RerankRequest, Task

DOCS = ["Paris is the capital of France", "bananas are yellow", "the capital of Peru is Lima", "France"]


def embed_only(name: str = "test/embedder"):
    return attrs.evolve(echo_manifest(name), tasks={Task.EMBED})


def test_register_rerank_backends_hook_registers_and_refuses():
    class Plugin:
        @hookimpl
        def register_rerank_backends(self, register):
            register(EchoBackend)

    class Wrong:
        @hookimpl
        def register_rerank_backends(self, register):
            register(dict)

    plugins = load_plugins(load_entry_points=False, extra_plugins=[Plugin(), Wrong()])
    assert [cls for cls, _ in plugins.backends[Task.RERANK]] == [EchoBackend]
    assert [f.stage for f in plugins.failures] == ["register_rerank_backends"]


def test_sigmoid_and_ranking():
    assert sigmoid(0.0) == 0.5
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0
    assert abs(sigmoid(2.0) - 1 / (1 + math.exp(-2))) < 1e-12
    assert ranking([0.1, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]  # ties keep the client's order
    assert ranking([0.1, 0.9, 0.5], top_n=2) == [1, 2]


def test_echo_double_passes_the_rerank_conformance_kit():
    backend = EchoBackend(echo_manifest(), Device("cpu"))
    asyncio.run(backend.start())
    conformance.check_rerank(backend, relevance=True)


def test_rerank_routes_answer_in_the_jina_cohere_shape(tmp_path):
    with serve([EchoBackend], home=tmp_path, models=[echo_manifest()]) as server:
        for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
            r = httpx.post(server.base_url + path, json={
                "model": "test/echo", "query": "capital of France", "documents": DOCS}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"id", "model", "results", "usage"}
            assert [x["index"] for x in body["results"]] == [0, 2, 3, 1]
            scores = [x["relevance_score"] for x in body["results"]]
            assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
            assert all("document" not in x for x in body["results"]), "return_documents defaults to false"
            assert body["usage"]["total_tokens"] == sum(3 + len(d.split()) for d in DOCS)
        r = httpx.post(server.base_url + "/v1/rerank", json={
            "model": "test/echo", "query": "capital of France", "top_n": 2, "return_documents": True,
            "documents": [DOCS[0], {"text": DOCS[1]}, {"text": DOCS[2]}]}, timeout=30)
        results = r.json()["results"]
        assert [(x["index"], x["document"]) for x in results] == [(0, {"text": DOCS[0]}), (2, {"text": DOCS[2]})]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"documents": []}, "documents", "at least one document"),
    ({"documents": ["a", "b", "c", "d"]}, "documents", "at most 3"),
    ({"documents": ["x" * 51]}, "documents", "limit is 50"),
    ({"query": "q" * 51}, "query", "limit is 50"),
    ({"documents": ["fine", "  "]}, "documents[1]", "matching regex"),
    ({"query": " "}, "query", "matching regex"),
    ({"top_n": 0}, "top_n", ">= 1"),
    ({"max_tokens_per_doc": 100}, "max_tokens_per_doc", "null"),
    ({"rank_fields": ["title"]}, "rank_fields", "null"),
])
def test_rerank_bad_input_is_a_400_naming_the_field(tmp_path, body, param, words):
    with serve([EchoBackend], home=tmp_path, models=[echo_manifest()],
               max_rerank_documents=3, max_rerank_chars=50) as server:
        payload = {"model": "test/echo", "query": "q", "documents": ["a"], **body}
        r = httpx.post(server.base_url + "/v1/rerank", json=payload, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error


def test_embedding_models_rerank_by_cosine(tmp_path):
    manifest = embed_only()
    backend = EchoBackend(manifest, Device("cpu"))
    asyncio.run(backend.start())
    query = "capital of France"
    vectors = asyncio.run(backend.run_embed(EmbedRequest([query, *DOCS]))).vectors
    expected = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    result = asyncio.run(rerank_by_embedding(backend, RerankRequest(query, DOCS + [query])))
    assert [round(s, 6) for s in result.scores[:-1]] == [round(s, 6) for s in expected]
    assert abs(result.scores[-1] - 1.0) < 1e-6, "the query itself is the closest document"
    with serve([EchoBackend], home=tmp_path, models=[manifest]) as server:
        r = httpx.post(server.base_url + "/v1/rerank", json={"model": manifest.name, "query": query,
                                                            "documents": DOCS}, timeout=30)
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert [round(got[i], 6) for i in range(len(DOCS))] == [round(s, 6) for s in expected]
        card = httpx.get(server.base_url + f"/v1/models/{manifest.name}", timeout=30).json()
        assert card["tasks"] == ["embed", "rerank"]


def test_a_model_that_neither_reranks_nor_embeds_is_refused(tmp_path):
    chat_only = attrs.evolve(echo_manifest("test/chatter"), tasks={Task.CHAT})
    with serve([EchoBackend], home=tmp_path, models=[chat_only]) as server:
        r = httpx.post(server.base_url + "/v1/rerank", json={"model": "test/chatter", "query": "q",
                                                            "documents": ["a"]}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported", r.text
        r = httpx.post(server.base_url + "/v1/rerank", json={"model": "nope/nope", "query": "q",
                                                            "documents": ["a"]}, timeout=30)
        assert r.status_code == 404, r.text


def _folder(tmp_path, files: dict[str, object]):
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
    listed = [ModelFile(p.name, p.stat().st_size) for p in tmp_path.iterdir()]
    return describe_folder("org/model", tmp_path, listed, source="local:test")


def test_pull_recognises_a_cross_encoder_by_its_one_label_head(tmp_path):
    manifest = _folder(tmp_path, {"config.json": {"architectures": ["BertForSequenceClassification"],
                                                  "id2label": {"0": "LABEL_0"}}})
    assert (manifest.format, manifest.tasks) == ("sentence-transformers", {Task.RERANK})


def test_pull_takes_a_two_label_classifier_for_no_reranker(tmp_path):
    manifest = _folder(tmp_path, {"config.json": {"architectures": ["BertForSequenceClassification"],
                                                  "id2label": {"0": "NEG", "1": "POS"}}})
    assert Task.RERANK not in manifest.tasks


def test_pull_recognises_a_sentence_transformers_cross_encoder_config(tmp_path):
    manifest = _folder(tmp_path, {"config.json": {"architectures": ["XLMRobertaModel"]},
                                  "config_sentence_transformers.json": {"model_type": "CrossEncoder"}})
    assert manifest.tasks == {Task.RERANK}


def test_pull_recognises_a_gguf_with_rank_pooling(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "reranker-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_context_length(512)
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    manifest = describe_folder("org/reranker", tmp_path, [ModelFile(path.name, path.stat().st_size)], source="local:x")
    assert manifest.tasks == {Task.RERANK}
    assert manifest.options["pooling_type"] == 4
