"""Embedding models (GGUFs with pooling, no chat template) on llama.cpp.

``LlamaCppEmbedBackend`` opens the model's ``Llama`` with embeddings on and puts as many
inputs in one decode as the batch and the sequence limit allow; vectors are pooled the
model's way (mean when the GGUF declares no pooling) and L2-normalised. Inputs are
strings or token-id arrays. Rerankers (pooling type rank) are refused. Chat models'
``/v1/embeddings`` are refused by selection (this class serves embedding models only).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar

from nexa.backend import CancelToken, LoadOptions
from nexa.errors import BadRequest, ContextLengthExceeded, ModelLoadError
from nexa.types import Device, EmbedRequest, EmbedResult, Manifest, Task
from nexa_llama_cpp.runtime import POOLING_RANK, GgufBackend

if TYPE_CHECKING:
    import llama_cpp


class LlamaCppEmbedBackend(GgufBackend):
    """GGUF embedding models on llama.cpp."""

    tasks: ClassVar[frozenset[Task]] = frozenset({Task.EMBED})
    parallel = 1
    """One ``Llama`` context, driven from one worker thread."""
    default_context: ClassVar[int] = 8192
    fallback_context: ClassVar[int] = 512

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        if Task.CHAT in manifest.tasks:
            return "a chat model: embeddings are served for embedding models only"
        if manifest.options.get("pooling_type") == POOLING_RANK:
            return "reranking models (pooling type rank) are not served"
        return super().supports(manifest, device)

    def __init__(self, manifest: Manifest, device: Device, options: LoadOptions | None = None):
        import attrs

        options = options or LoadOptions()
        super().__init__(manifest, device, attrs.evolve(options, parallel=1))
        self._llama: llama_cpp.Llama | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        import llama_cpp

        n_ctx = self.context_length()
        # Non-causal encoders need each input whole in one micro-batch.
        settings: dict[str, Any] = {"embedding": True, "n_batch": n_ctx, "n_ubatch": n_ctx}
        if "pooling_type" not in self.manifest.options:
            # No pooling in the GGUF: mean pooling rather than per-token vectors.
            settings["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self._llama = self.open_llama(**settings)
        if self._llama.pooling_type() == POOLING_RANK:
            raise ModelLoadError(f"{self.manifest.name!r} is a reranker, not an embedding model")

    def close(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def embed(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        with self._lock:
            return self._embed(request, cancel)

    def _embed(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        import llama_cpp
        import numpy as np

        llama = self._llama
        assert llama is not None
        n_ctx = llama.n_ctx()
        n_vocab = llama.n_vocab()
        sequences: list[list[int]] = []
        for i, item in enumerate(request.inputs):
            if isinstance(item, str):
                ids = llama.tokenize(item.encode("utf-8"), add_bos=True, special=False)
            else:
                ids = [int(t) for t in item]
                if any(t < 0 or t >= n_vocab for t in ids):
                    raise BadRequest(
                        f"input {i} has token ids outside the model's vocabulary (0..{n_vocab - 1})",
                        param="input",
                    )
            if not ids:
                raise BadRequest(f"input {i} is empty", param="input")
            if len(ids) > n_ctx:
                raise ContextLengthExceeded(
                    f"input {i} has {len(ids)} tokens; this model's maximum context length "
                    f"is {n_ctx} tokens",
                    param="input",
                )
            sequences.append(ids)

        n_embd = llama.n_embd()
        max_seqs = max(1, int(llama.context_params.n_seq_max))
        vectors: list[tuple[float, ...]] = [()] * len(sequences)

        def run(group: list[int]) -> None:
            cancel.raise_if_cancelled()
            llama._ctx.kv_cache_clear()
            llama._batch.reset()
            for seq, index in enumerate(group):
                llama._batch.add_sequence(sequences[index], seq, True)
            llama._ctx.decode(llama._batch)
            for seq, index in enumerate(group):
                ptr = llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, seq)
                vec = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(vec))
                if norm > 0:
                    vec /= norm
                vectors[index] = tuple(vec.tolist())
            llama._batch.reset()

        # As many inputs per decode as the batch and the sequence limit allow.
        group: list[int] = []
        used = 0
        for index, ids in enumerate(sequences):
            if group and (used + len(ids) > llama.n_batch or len(group) >= max_seqs):
                run(group)
                group, used = [], 0
            group.append(index)
            used += len(ids)
        if group:
            run(group)
        llama._ctx.kv_cache_clear()
        return EmbedResult(vectors=tuple(vectors), prompt_tokens=sum(len(s) for s in sequences))
