"""The seed's other architectures load and serve: ``qwen3vl`` with its ``qwen3vl_merger``
mmproj (the seed's VLM) and ``jina-bert-v2`` (the seed's embeddings), as tiny GGUFs the
tests write (``seed_models``), pulled through the loopback Hub under the seed's names
and asked with the seed's request bodies. Random weights: the checks are on what the
server promises whatever the weights say (shapes, usage, logprobs, norms, order)."""

from __future__ import annotations

import base64
import math

import httpx
import pytest
from conftest import pull_from_loopback_hub

from nexa.testing import serve
from nexa_llama_cpp import plugin
from nexa_llama_cpp import seed_models as sm
from nexa_llama_cpp.testing import png_bytes

VLM = "NexaAI/qwen3vl-GGUF"
EMBED = "djuna/jina-embeddings-v2-small-en-Q5_K_M-GGUF"


@pytest.fixture(scope="module")
def server(tmp_path_factory, device):
    src = tmp_path_factory.mktemp("seed-src")
    vlm = sm.write_tiny_qwen3vl(src / "qwen3vl")
    jina = sm.write_tiny_jina_v2(src / "jina-embeddings-v2-small-en-q5_k_m.gguf")
    repos = {
        VLM: {p.name: p.read_bytes() for p in vlm.iterdir()} | {"README.md": b"# Qwen3-VL\n"},
        EMBED: {jina.name: jina.read_bytes(), "README.md": b"# jina v2\n"},
    }
    home = tmp_path_factory.mktemp("seed-home")
    pull_from_loopback_hub(home, repos)
    with serve(home=home, extra_plugins=[plugin], device=device.kind, threads=1) as handle:
        yield handle


def post(server, path, body):
    return httpx.post(server.base_url + path, json=body, timeout=120)


def test_the_models_are_listed_with_their_tasks(server):
    cards = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]}
    assert "vlm" in cards[VLM]["tasks"]
    assert "embed" in cards[EMBED]["tasks"]


def test_the_seed_vlm_request_answers_about_an_image(server):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()
    body = {"model": VLM, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is main color of the picture"},
        {"type": "image_url", "image_url": {"url": url}}]}], "stream": False, "max_tokens": 4,
        "logprobs": True, "top_logprobs": 3}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    text = post(server, "/v1/chat/completions", body | {"messages": [{"role": "user", "content": "what is main color"}]})
    assert text.status_code == 200, text.text
    # The image's tokens are in the prompt (a 64x64 picture: 4x4 patches merged 2x2 at least).
    assert usage["prompt_tokens"] >= text.json()["usage"]["prompt_tokens"] + 4
    # The image path samples with the engine's Sampler: one record per generated token.
    records = choice["logprobs"]["content"]
    assert len(records) == usage["completion_tokens"] > 0
    for record in records:
        assert len(record["top_logprobs"]) == 3
        assert record["logprob"] <= 0
        assert sum(math.exp(t["logprob"]) for t in record["top_logprobs"]) <= 1 + 1e-6


def test_the_seed_embeddings_request_gives_a_unit_vector(server):
    r = post(server, "/v1/embeddings", {"model": EMBED, "input": "Hello, world!"})
    assert r.status_code == 200, r.text
    vector = r.json()["data"][0]["embedding"]
    assert len(vector) == 32  # the tiny model's width
    assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-4)
    both = post(server, "/v1/embeddings", {"model": EMBED, "input": ["Hello, world!", "the cat"]}).json()["data"]
    assert both[0]["embedding"] == pytest.approx(vector, abs=1e-4)
    assert both[1]["embedding"] != pytest.approx(vector, abs=1e-3)
