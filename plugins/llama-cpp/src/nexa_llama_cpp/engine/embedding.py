"""Pooled embeddings on the batching engine's own model, computed on the engine thread.

``EmbeddingContext`` is a second, small llama context with pooled embeddings on the same
weights (no second load), created when the first embedding job arrives and grown when a
longer input comes. The engine thread runs its jobs between decode steps, so an embedding
never waits for the running chats to end and never races the chat context. Pooling is the
model's own (``pooling_type`` in the GGUF, or the engine's ``embed_pooling``); a chat model
that declares none is mean-pooled.
"""

from __future__ import annotations

from typing import Any

from nexa.errors import Cancelled
from nexa_llama_cpp.engine.records import EmbedJob


class EmbeddingContext:
    """The engine's embedding context (owned by the engine thread; ``close`` frees it)."""

    def __init__(
        self,
        lib: Any,
        model: Any,
        *,
        n_threads: int,
        n_threads_batch: int,
        op_offload: bool,
        pooling: int | None,
    ) -> None:
        self._L = lib
        self._model = model
        self._n_threads = n_threads
        self._n_threads_batch = n_threads_batch
        self._op_offload = op_offload
        self._pooling = pooling
        self._ctx: Any = None
        self._n_ctx = 0

    def run(self, job: EmbedJob) -> list[list[float]]:
        """One vector per input of ``job`` (raises ``Cancelled`` between inputs)."""
        import numpy as np

        L = self._L
        ctx = self._context(max(len(t) for t in job.inputs))
        n_embd = L.llama_model_n_embd(self._model)
        batch = L.llama_batch_init(self._n_ctx, 0, 1)
        out: list[list[float]] = []
        try:
            mem = L.llama_get_memory(ctx)
            for tokens in job.inputs:
                if job.control.done():
                    raise Cancelled()
                L.llama_memory_clear(mem, True)
                for i, t in enumerate(tokens):
                    batch.token[i] = t
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                batch.n_tokens = len(tokens)
                ret = L.llama_decode(ctx, batch)
                if ret != 0:
                    raise RuntimeError(f"llama_decode failed with status {ret} while embedding")
                ptr = L.llama_get_embeddings_seq(ctx, 0)
                if not ptr:
                    raise RuntimeError("llama.cpp returned no pooled embedding")
                vec = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
                if job.normalize:
                    norm = float(np.linalg.norm(vec))
                    if norm > 0:
                        vec = vec / norm
                out.append(vec.tolist())
        finally:
            L.llama_batch_free(batch)
        return out

    def _context(self, longest: int) -> Any:
        if self._ctx is not None and self._n_ctx >= longest:
            return self._ctx
        self.close()
        L = self._L
        n_ctx = max(512, 1 << (longest - 1).bit_length())
        p = L.llama_context_default_params()
        p.n_ctx = n_ctx
        # Non-causal encoders need each input whole in one micro-batch.
        p.n_batch = n_ctx
        p.n_ubatch = n_ctx
        p.n_seq_max = 1
        p.n_threads = self._n_threads
        p.n_threads_batch = self._n_threads_batch
        p.embeddings = True
        p.op_offload = self._op_offload
        p.no_perf = True
        p.pooling_type = L.LLAMA_POOLING_TYPE_UNSPECIFIED if self._pooling is None else self._pooling
        ctx = L.llama_init_from_model(self._model, p)
        if not ctx:
            raise RuntimeError("llama.cpp could not create an embedding context")
        if L.llama_pooling_type(ctx) == L.LLAMA_POOLING_TYPE_NONE:
            # A chat model declares no pooling: mean over its tokens.
            L.llama_free(ctx)
            p.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
            ctx = L.llama_init_from_model(self._model, p)
            if not ctx:
                raise RuntimeError("llama.cpp could not create an embedding context")
        self._ctx, self._n_ctx = ctx, n_ctx
        return ctx

    def close(self) -> None:
        if self._ctx is not None:
            self._L.llama_free(self._ctx)
            self._ctx = None
            self._n_ctx = 0
