"""What the chat, embedding and rerank backends share: the GGUF backend's class settings,
the installed library's device support, thread counts, the context size, opening a
``Llama``, the vocabulary's special texts, and pooled decodes (many sequences per decode,
one pooled output each) for the embedding and rerank backends.

``llama_cpp`` is imported inside methods only: selecting a backend never pays for it.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from nexa.backend import Backend, LoadOptions
from nexa.errors import ModelLoadError
from nexa.types import Device, Manifest, ResidentInfo

if TYPE_CHECKING:
    import llama_cpp

POOLING_RANK = 4
"""llama.cpp's pooling type of rerankers (``rerank.LlamaCppRerankBackend``)."""


def default_threads() -> int:
    """CPU threads for llama.cpp (decode and prompt) when ``--threads`` is not given: the
    physical cores, as llama.cpp's own tools and Ollama choose.

    All of them only while no other work wants a core: ggml's thread pool meets at a
    spinning barrier after every graph node, so a decode thread that loses its core stalls
    the rest (10-50x slower on a busy 2-core machine). The batching engine therefore
    adapts the count between decodes from measured step times
    (``nexa_llama_cpp.engine.threads``); ``--threads N`` fixes it.
    """
    from nexa_llama_cpp.engine.threads import physical_cores

    return physical_cores()


def library_files() -> list[str]:
    """The file names in the installed llama-cpp-python's ``lib`` folder ([] if unknown)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "lib"
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:
        return []


def missing_device_support(kind: str, files: Sequence[str]) -> str | None:
    """Why the installed llama.cpp libraries can't use device ``kind`` (None if they can).

    A CPU-only wheel on a GPU machine would silently run on the CPU; refusing lets a
    backend built for the device win, or tells the user to rebuild. Unknown layouts
    (no library folder found) are given the benefit of the doubt.
    """
    if kind not in ("cuda", "metal") or not files:
        return None
    if any(f"ggml-{kind}" in name for name in files):
        return None
    return f"llama-cpp-python is installed without {kind} support (rebuild it with {kind} on)"


class GgufBackend(Backend):
    """Base of the llama.cpp backends: one GGUF model on llama-cpp-python."""

    name: ClassVar[str] = "llama-cpp"
    formats: ClassVar[frozenset[str]] = frozenset({"gguf"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda", "metal"})
    priority: ClassVar[int] = 10
    default_context: ClassVar[int] = 4096
    """n_ctx when neither the server nor the model says less: the KV cache of a model's
    full trained context (32k-128k) would cost gigabytes for requests that rarely need it."""
    fallback_context: ClassVar[int] = 4096
    """n_ctx of a model whose trained context is unknown."""
    honours_context_length: ClassVar[bool] = True

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        if not manifest.has_role("weights"):
            return "the model has no GGUF weights file"
        return missing_device_support(device.kind, library_files())

    def context_length(self) -> int:
        """n_ctx: the server's override, else the trained context capped at a default."""
        if self.options.context_length:
            return int(self.options.context_length)
        trained = self.manifest.context_length or 0
        return min(trained, self.default_context) if trained > 0 else self.fallback_context

    def resident_info(self) -> ResidentInfo:
        """The KV cache from the model's shape: cells of this model's llama.cpp contexts (its
        ``Llama``'s, and a batching engine's) x layers x (key + value width of the KV heads)
        x 2 bytes (f16, the cache type used)."""
        info = super().resident_info()
        llama: Any = getattr(self, "_llama", None)
        if llama is None:
            return info
        import llama_cpp

        model, meta = llama._model.model, llama.metadata
        arch = meta.get("general.architecture", "")
        head_dim = llama_cpp.llama_model_n_embd(model) // max(1, llama_cpp.llama_model_n_head(model))
        width = llama_cpp.llama_model_n_head_kv(model) * (
            int(meta.get(f"{arch}.attention.key_length", head_dim)) + int(meta.get(f"{arch}.attention.value_length", head_dim)))
        engine = getattr(self, "_engine", None)
        # Encoders (BERT-like embedders) have no KV memory at all.
        cells = (llama.n_ctx() if llama_cpp.llama_get_memory(llama._ctx.ctx) else 0) + (engine.kv_size if engine else 0)
        return attrs.evolve(info, kv_cache_bytes=cells * llama_cpp.llama_model_n_layer(model) * width * 2,
                            context=self.context_length())

    @property
    def threads(self) -> int:
        """The (most) CPU threads: ``--threads``, else the physical cores."""
        return self.options.threads or default_threads()

    @property
    def adaptive_threads(self) -> bool:
        """Whether the count adapts to contention: not when fixed by ``--threads``, nor
        on a GPU (the threads then only feed it)."""
        return not self.options.threads and self.device.kind == "cpu"

    def cache_types(self) -> dict[str, Any]:
        """``type_k``/``type_v`` for ``Llama`` (ggml types) from ``--cache-type-k/-v``."""
        from nexa_llama_cpp.engine.kv_types import kv_type

        return {
            "type_k": kv_type(self.options.cache_type_k, flag="--cache-type-k").ggml_type,
            "type_v": kv_type(self.options.cache_type_v, flag="--cache-type-v").ggml_type,
        }

    def llama_settings(self) -> dict[str, Any]:
        """``Llama`` keyword arguments every model of this backend is opened with."""
        return {
            "n_ctx": self.context_length(),
            "n_threads": self.threads,
            # Prompt batches too: all cores collapse under the same contention (see
            # default_threads), and llama.cpp's default is the same count for both.
            "n_threads_batch": self.threads,
            "n_gpu_layers": -1 if self.device.kind in ("cuda", "metal") else 0,
            # `--device cpu` on a GPU build: llama.cpp would still send large prompt
            # batches to the GPU ("op offload"); cpu means the CPU alone.
            "op_offload": self.device.kind != "cpu",
            "verbose": False,
        }

    def open_llama(self, **settings: Any) -> llama_cpp.Llama:
        """The model file opened with ``llama_settings()`` updated by ``settings``."""
        import llama_cpp

        from nexa_llama_cpp.native import route_native_logs

        route_native_logs()
        path = self.manifest.file_path("weights")
        try:
            return llama_cpp.Llama(str(path), **(self.llama_settings() | settings))
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {path.name} for {self.manifest.name!r}: {exc}"
            ) from exc


class PooledGgufBackend(GgufBackend):
    """Base of the embedding and rerank backends: one ``Llama`` with embeddings on, read
    per sequence after each decode (``decode_pooled``), one request at a time."""

    parallel = 1
    """One ``Llama`` context, driven from one worker thread."""
    default_context: ClassVar[int] = 8192
    fallback_context: ClassVar[int] = 512

    def __init__(self, manifest: Manifest, device: Device, options: LoadOptions | None = None):
        options = options or LoadOptions()
        super().__init__(manifest, device, attrs.evolve(options, parallel=1))
        self._llama: llama_cpp.Llama | None = None
        self._lock = threading.Lock()
        """Held by a request: the one context serves one at a time."""

    def open_pooled(self, **settings: Any) -> llama_cpp.Llama:
        """The model opened with embeddings on and ``settings``, its batch and micro-batch
        the whole context: a non-causal encoder needs each sequence whole in one micro-batch."""
        n_ctx = self.context_length()
        return self.open_llama(**({"embedding": True, "n_batch": n_ctx, "n_ubatch": n_ctx} | settings))

    def close(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()


def special_texts(llama: Any) -> list[str]:
    """The texts of the vocabulary's control and unknown tokens: what llama.cpp parses as
    special only when asked to (user-defined tokens it matches in plain text too)."""
    import llama_cpp

    vocab = llama._model.vocab
    wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    out = []
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & wanted:
            text = llama_cpp.llama_vocab_get_text(vocab, token)
            if text:
                out.append(text.decode("utf-8", "replace"))
    return out


# --- pooled decodes (embedding and rerank models) -------------------------------------


def pooled_groups(lengths: Sequence[int], n_batch: int, max_seqs: int) -> Iterator[list[int]]:
    """Indexes of the sequences of ``lengths`` tokens, grouped in order into decodes of at
    most ``n_batch`` tokens and ``max_seqs`` sequences; a longer sequence is a group alone."""
    group: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if group and (used + length > n_batch or len(group) >= max_seqs):
            yield group
            group, used = [], 0
        group.append(index)
        used += length
    if group:
        yield group


def decode_pooled(llama: llama_cpp.Llama, sequences: Sequence[Sequence[int]], width: int) -> list[Any]:
    """Decode ``sequences`` together, one sequence id each, in one ``llama_decode``, and
    return each one's pooled output: ``width`` floats (``n_embd`` for an embedding model,
    ``n_cls_out`` for a reranker) as a float64 numpy array, in order.

    The context must be open with embeddings on and ``n_ubatch`` at least the group's
    tokens: a non-causal encoder needs each sequence whole in one micro-batch."""
    import llama_cpp
    import numpy as np

    llama._ctx.kv_cache_clear()
    llama._batch.reset()
    try:
        for seq, ids in enumerate(sequences):
            llama._batch.add_sequence(list(ids), seq, True)
        llama._ctx.decode(llama._batch)
        out = []
        for seq in range(len(sequences)):
            ptr = llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, seq)
            out.append(np.ctypeslib.as_array(ptr, shape=(width,)).astype(np.float64))
        return out
    finally:
        llama._batch.reset()
