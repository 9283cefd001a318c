"""Two quants of one repo, pulled from the loopback Hub by the real huggingface_hub client,
served side by side by llama.cpp over HTTP; removing one leaves the other serving."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from nexa.hub import pull
from nexa.store import AMBIGUOUS, ModelStore
from nexa.testing import serve
from nexa.testing.hubserver import HubServer
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.backend import LlamaCppBackend

REPO = "acme/Tiny-GGUF"
MMPROJ = "mmproj-Tiny-F32.gguf"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    # Two "quants" (differently seeded F32 weights named as quants, as the test models are
    # small) and the projector both use.
    src = tmp_path_factory.mktemp("hub-src")
    paths = [
        tiny.write_tiny_llama(src / "Tiny-Q4_K_M.gguf", seed=1),
        tiny.write_tiny_llama(src / "Tiny-Q8_0.gguf", seed=2),
        tiny.write_tiny_mmproj(src / MMPROJ),
    ]
    return {p.name: p.read_bytes() for p in paths}


@pytest.fixture
def pulled(repo_files, tmp_path, monkeypatch) -> ModelStore:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    store = ModelStore(tmp_path / "home")
    with HubServer({REPO: repo_files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        pull(store, REPO)
        pull(store, f"{REPO}:Q8_0")
    return store


def answer(client, model: str) -> str:
    done = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0, seed=1)
    assert done.model == model and done.usage.completion_tokens > 0
    return done.choices[0].message.content


def test_both_quants_serve_and_each_can_go(pulled, device):
    plain, q8 = pulled.get(REPO), pulled.get(f"{REPO}:Q8_0")
    a, b = (plain.root / MMPROJ).stat(), (q8.root / MMPROJ).stat()
    assert a.st_ino == b.st_ino and a.st_nlink == 2  # one projector on disk

    with serve([LlamaCppBackend], home=pulled.home, device=device.kind, threads=1) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == [REPO, f"{REPO}:Q8_0"]
        first = answer(client, REPO)
        second = answer(client, f"{REPO}:Q8_0")
        assert answer(client, f"{REPO}:Q4_K_M") == first  # the untagged model, by its quant
        assert first != second  # two different weight files answered, not one twice
        health = httpx.get(server.base_url + "/health").json()
        assert health["models_loaded"] == [REPO, f"{REPO}:Q8_0"]  # two models resident

        # Remove the Q8_0 quant from the store: the untagged model keeps its files.
        server.store.remove(f"{REPO}:Q8_0")
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=f"{REPO}:Q8_0", messages=HELLO, max_tokens=2)
    assert (plain.root / MMPROJ).stat().st_nlink == 1

    # A fresh server loads what is left from disk: the projector survived the removal.
    with serve([LlamaCppBackend], home=pulled.home, device=device.kind, threads=1) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        assert answer(client, REPO) == first
        png = base64.b64encode(tiny.png_bytes()).decode()
        image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
        seen = client.chat.completions.create(
            model=REPO, max_tokens=3, temperature=0,
            messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}])
        assert seen.usage.prompt_tokens > 16  # the image's embeddings went in


def test_the_bare_name_is_refused_when_two_tagged_quants_are_there(repo_files, tmp_path, monkeypatch, device):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    store = ModelStore(tmp_path / "home")
    with HubServer({REPO: repo_files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        pull(store, f"{REPO}:Q4_K_M")
        pull(store, f"{REPO}:Q8_0")
    with serve([LlamaCppBackend], home=store.home, device=device.kind, threads=1) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=REPO, messages=HELLO, max_tokens=2)
        error = err.value.body
        assert error["code"] == AMBIGUOUS and error["param"] == "model"
        assert f"{REPO}:Q4_K_M" in error["message"] and f"{REPO}:Q8_0" in error["message"]
        answer(client, f"{REPO}:Q4_K_M")
