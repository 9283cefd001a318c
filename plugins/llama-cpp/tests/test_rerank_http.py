"""GGUF rerankers behind the real server: the plugin registered through its hooks, plain
JSON on ``/v1/rerank``, ``/v2/rerank`` and ``/rerank``, the official Cohere client (v1 and
v2), batching seen on ``/metrics``, 400s, and ``nexa pull`` of a reranker repo from the
loopback Hub. The tiny rerankers score the share of the word "capital" in a pair
(``nexa_llama_cpp.testing``), so the order of their answers is known."""

from __future__ import annotations

import os
import subprocess
import sys

import cohere
import httpx
import pytest
from conftest import CHAT, EMBED

from nexa.testing import serve
from nexa.testing.hubserver import HubServer
from nexa_llama_cpp import plugin
from nexa_llama_cpp import testing as tiny

BERT = "test/tiny-rerank-bert"
QWEN3 = "test/tiny-rerank-qwen3"
QUERY = "which city is the capital?"
GRADED = ["the cat the cat the cat", "capital the cat the cat", "capital capital the cat",
          "capital capital capital cat"]
ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_sources, device):
    src = tmp_path_factory.mktemp("rerank-src")
    rerankers = {
        BERT: tiny.write_tiny_bert_reranker(src / "tiny-rerank-bert-F32.gguf"),
        QWEN3: tiny.write_tiny_qwen3_reranker(src / "tiny-rerank-qwen3-F32.gguf"),
    }
    # The plugin module itself registers the backends, through its hooks.
    with serve(home=tmp_path_factory.mktemp("rerank-http"), extra_plugins=[plugin], device=device.kind,
               threads=1) as handle:
        for name, path in {**rerankers, CHAT: model_sources[CHAT], EMBED: model_sources[EMBED]}.items():
            handle.store.import_path(path, name=name)
        yield handle


def post(server, path, **body):
    return httpx.post(server.base_url + path, json=body, timeout=120)


def test_models_list_the_rerank_task(server):
    cards = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]}
    assert cards[BERT]["tasks"] == ["rerank"] and cards[QWEN3]["tasks"] == ["rerank"]
    assert cards[EMBED]["tasks"] == ["embed", "rerank"]  # by cosine, through the embedding backend
    assert "rerank" not in cards[CHAT]["tasks"]


@pytest.mark.parametrize("model", [BERT, QWEN3])
def test_every_route_ranks_by_the_scripted_relevance(server, model):
    answers = []
    for path in ROUTES:
        r = post(server, path, model=model, query=QUERY, documents=GRADED, return_documents=True)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["index"] for x in body["results"]] == [3, 2, 1, 0]
        assert [x["document"]["text"] for x in body["results"]] == GRADED[::-1]
        scores = [x["relevance_score"] for x in body["results"]]
        assert all(0.0 < s < 1.0 for s in scores)
        assert body["model"] == model and body["usage"]["total_tokens"] > 0
        answers.append((scores, body["usage"]["total_tokens"]))
    assert answers[0] == answers[1] == answers[2]  # one engine behind three dialects
    top = post(server, "/v1/rerank", model=model, query=QUERY, top_n=2,
               documents=[GRADED[0], {"text": GRADED[3]}, {"text": GRADED[1]}]).json()["results"]
    assert [x["index"] for x in top] == [1, 2] and all("document" not in x for x in top)


def test_cohere_v2_client(server):
    client = cohere.ClientV2(base_url=server.base_url, api_key="unused")
    answer = client.rerank(model=QWEN3, query=QUERY, documents=GRADED, top_n=3)
    assert [r.index for r in answer.results] == [3, 2, 1]
    assert answer.results[0].relevance_score > answer.results[1].relevance_score > answer.results[2].relevance_score


def test_cohere_v1_client(server):
    client = cohere.Client(base_url=server.base_url, api_key="unused")
    answer = client.rerank(model=BERT, query=QUERY, documents=GRADED, return_documents=True)
    assert [r.index for r in answer.results] == [3, 2, 1, 0]
    assert [r.document.text for r in answer.results] == GRADED[::-1]
    assert all(0.0 < r.relevance_score < 1.0 for r in answer.results)


def test_64_documents_in_one_request_take_a_handful_of_decodes(server):
    documents = [f"passage {i} about the capital" if i % 4 == 0 else f"passage {i} about cats" for i in range(64)]
    assert post(server, "/v1/rerank", model=BERT, query=QUERY, documents=documents[:1]).status_code == 200
    labels = f'{{backend="llama-cpp",model="{BERT}"}}'
    decodes, documents_seen = (server.metric(f"nexa_backend_rerank_{n}_total{labels}") for n in ("decodes", "documents"))
    r = post(server, "/v1/rerank", model=BERT, query=QUERY, documents=documents)
    assert r.status_code == 200, r.text
    assert [x["index"] % 4 for x in r.json()["results"][:16]] == [0] * 16  # the "capital" passages first
    assert server.metric(f"nexa_backend_rerank_documents_total{labels}") - documents_seen == 64
    used = server.metric(f"nexa_backend_rerank_decodes_total{labels}") - decodes
    assert 1 <= used <= 8, used  # ~40 tokens a pair, ~12 pairs in a 512-token decode


def test_a_too_long_document_is_a_400_naming_it(server):
    r = post(server, "/v1/rerank", model=BERT, query=QUERY, documents=["fine", "word " * 600])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "documents" and "documents[1]" in error["message"], error


def test_a_chat_gguf_does_not_rerank_and_an_embedding_gguf_reranks_by_cosine(server):
    r = post(server, "/v1/rerank", model=CHAT, query=QUERY, documents=GRADED)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    r = post(server, "/v1/rerank", model=EMBED, query=QUERY, documents=GRADED)
    assert r.status_code == 200, r.text
    assert all(-1.0 <= x["relevance_score"] <= 1.0 for x in r.json()["results"])


def test_a_reranker_serves_no_embeddings(server):
    r = post(server, "/v1/embeddings", model=BERT, input="hello")
    assert r.status_code == 400, r.text


# --- nexa pull ------------------------------------------------------------------------------------

REPO = "acme/tiny-reranker-GGUF"


def test_nexa_pull_of_a_reranker_repo_serves_it(tmp_path, device):
    gguf = tiny.write_tiny_bert_reranker(tmp_path / "src" / "tiny-reranker-F32.gguf").read_bytes()
    home = tmp_path / "home"
    with HubServer({REPO: {"tiny-reranker-F32.gguf": gguf, "README.md": b"# a reranker\n"}}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            env.pop(var, None)
        out = subprocess.run([sys.executable, "-m", "nexa.cli", "--home", str(home), "pull", REPO, "--quiet"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    with serve(home=home, extra_plugins=[plugin], device=device.kind, threads=1) as server:
        cards = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]}
        assert cards[REPO]["tasks"] == ["rerank"]
        r = post(server, "/v1/rerank", model=REPO, query=QUERY, documents=GRADED)
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()["results"]] == [3, 2, 1, 0]
