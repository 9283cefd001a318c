"""Embedding models (GGUFs with pooling, no chat template) on llama.cpp.

``LlamaCppEmbedBackend`` opens the model's ``Llama`` with embeddings on and puts as many
inputs in one decode as the batch and the sequence limit allow; vectors are pooled the
model's way (mean when the GGUF declares no pooling) and L2-normalised. Inputs are
strings or token-id arrays. Rerankers (pooling type rank) are ``rerank.LlamaCppRerankBackend``'s.
Chat models' ``/v1/embeddings`` are refused by selection (this class serves embedding models only).
"""

from __future__ import annotations

from typing import Any, ClassVar

from nexa.backend import CancelToken
from nexa.errors import BadRequest, ContextLengthExceeded, ModelLoadError
from nexa.text import head_tokens
from nexa.types import Device, EmbedRequest, EmbedResult, Manifest, Task
from nexa_llama_cpp.runtime import POOLING_RANK, PooledGgufBackend, decode_pooled, pooled_groups


class LlamaCppEmbedBackend(PooledGgufBackend):
    """GGUF embedding models on llama.cpp."""

    tasks: ClassVar[frozenset[Task]] = frozenset({Task.EMBED})

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        if Task.CHAT in manifest.tasks:
            return "a chat model: embeddings are served for embedding models only"
        if manifest.options.get("pooling_type") == POOLING_RANK:
            return "a reranker (pooling type rank): served by /v1/rerank, not /v1/embeddings"
        return super().supports(manifest, device)

    def load(self) -> None:
        import llama_cpp

        settings: dict[str, Any] = {}
        if "pooling_type" not in self.manifest.options:
            # No pooling in the GGUF: mean pooling rather than per-token vectors.
            settings["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self._llama = self.open_pooled(**settings)
        if self._llama.pooling_type() == POOLING_RANK:
            raise ModelLoadError(f"{self.manifest.name!r} is a reranker, not an embedding model")

    def embed(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        with self._lock:
            return self._embed(request, cancel)

    def _embed(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        import numpy as np

        llama = self._llama
        assert llama is not None
        n_ctx = llama.n_ctx()
        n_vocab = llama.n_vocab()
        sequences: list[list[int]] = []
        for i, item in enumerate(request.inputs):
            if isinstance(item, str):
                # Only as far as it takes to know an input is over the context.
                ids, _ = head_tokens(
                    lambda text: llama.tokenize(text.encode("utf-8"), add_bos=True, special=False), item, n_ctx
                )
            else:
                ids = [int(t) for t in item]
                if any(t < 0 or t >= n_vocab for t in ids):
                    raise BadRequest(
                        f"input[{i}] has token ids outside the model's vocabulary (0..{n_vocab - 1})",
                        param="input",
                    )
            if not ids:
                raise BadRequest(f"input[{i}] is empty", param="input")
            if len(ids) > n_ctx:
                raise ContextLengthExceeded(
                    f"input[{i}] has more than {n_ctx} tokens, this model's maximum context length",
                    param="input",
                )
            sequences.append(ids)

        n_embd = llama.n_embd()
        max_seqs = max(1, int(llama.context_params.n_seq_max))
        vectors: list[tuple[float, ...]] = [()] * len(sequences)
        # As many inputs per decode as the batch and the sequence limit allow.
        for group in pooled_groups([len(s) for s in sequences], llama.n_batch, max_seqs):
            cancel.raise_if_cancelled()
            pooled = decode_pooled(llama, [sequences[i] for i in group], n_embd)
            for index, vec in zip(group, pooled, strict=True):
                norm = float(np.linalg.norm(vec))
                if norm > 0:
                    vec /= norm
                vectors[index] = tuple(vec.tolist())
        llama._ctx.kv_cache_clear()
        return EmbedResult(vectors=tuple(vectors), prompt_tokens=sum(len(s) for s in sequences))
