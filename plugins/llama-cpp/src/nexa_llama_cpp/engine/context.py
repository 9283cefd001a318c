"""The native resources one batching engine owns: the model, its llama context, the batch
buffer, the prefill abort and the vocabulary's token helpers.

``EngineContext`` is made on the engine thread (``llama_cpp`` is imported there) and freed
there; its token helpers are safe from any thread once it exists.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from typing import Any

from nexa.errors import ModelLoadError
from nexa_llama_cpp.engine.kv_types import DEFAULT_KV_TYPE, KV_TYPES, KvType, check_head_sizes
from nexa_llama_cpp.native import PrefillAbort, ThreadPool, route_native_logs


def context_params(
    L: Any, *, n_ctx: int, n_batch: int, n_seq: int, n_threads: int, n_threads_batch: int,
    kv_unified: bool, op_offload: bool, flash_attn: bool,
) -> Any:
    """llama.cpp context parameters as the engine's contexts use them (the target's and a
    draft model's): ``n_ctx`` cells for ``n_seq`` sequences, one micro-batch per batch."""
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_seq_max = n_seq
    cparams.n_threads = n_threads
    cparams.n_threads_batch = n_threads_batch
    cparams.kv_unified = kv_unified
    cparams.op_offload = op_offload
    cparams.no_perf = True
    cparams.flash_attn_type = 1 if flash_attn else 0
    return cparams

class EngineContext:
    """A llama model (loaded from ``model_path``, or ``model`` loaded elsewhere and not
    freed here) and one context of ``kv_size`` cells for ``n_seq`` sequences."""

    def __init__(
        self,
        *,
        model_path: str | None,
        model: Any,
        n_gpu_layers: int,
        kv_size: int,
        n_seq: int,
        n_batch: int,
        n_threads: int,
        n_threads_batch: int,
        kv_unified: bool,
        op_offload: bool,
        flash_attn: bool,
        type_k: KvType | None = None,
        type_v: KvType | None = None,
    ) -> None:
        import llama_cpp.llama_cpp as L  # heavy: only on the engine thread
        from llama_cpp._logger import logger as native_log

        self.L = L
        self.model = model
        self._owns_model = model is None
        self.ctx: Any = None
        self.batch: Any = None
        self.abort: PrefillAbort | None = None
        self.pool: ThreadPool | None = None
        """The persistent thread pool of a CPU context with several threads (``set_threads``)."""
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._eog: dict[int, bool] = {}
        try:
            if native_log.level == logging.NOTSET:
                # llama.cpp logs every tensor at load unless told otherwise (as Llama(verbose=False) does).
                native_log.setLevel(logging.ERROR)
            route_native_logs()
            L.llama_backend_init()
            if self.model is None:
                params = L.llama_model_default_params()
                params.n_gpu_layers = n_gpu_layers
                assert model_path is not None
                if not os.path.isfile(model_path):
                    raise ModelLoadError(f"model file not found: {model_path}")
                self.model = L.llama_model_load_from_file(model_path.encode("utf-8"), params)
                if not self.model:
                    raise ModelLoadError(f"llama.cpp could not load {model_path}")
            self.vocab = L.llama_model_get_vocab(self.model)
            self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
            type_k = type_k or KV_TYPES[DEFAULT_KV_TYPE]
            type_v = type_v or KV_TYPES[DEFAULT_KV_TYPE]
            check_head_sizes(L, self.model, type_k, type_v)

            cparams = context_params(L, n_ctx=kv_size, n_batch=n_batch, n_seq=n_seq, n_threads=n_threads,
                                     n_threads_batch=n_threads_batch, kv_unified=kv_unified,
                                     op_offload=op_offload, flash_attn=flash_attn)
            cparams.type_k = type_k.ggml_type
            cparams.type_v = type_v.ggml_type
            self.ctx = L.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise ModelLoadError("llama.cpp could not create a context (out of memory?)")
            self.memory = L.llama_get_memory(self.ctx)
            self.abort = PrefillAbort(L, self.ctx)
            self.batch = L.llama_batch_init(n_batch, 0, 1)
            if n_gpu_layers == 0 and n_threads > 1 and n_threads_batch == n_threads:
                self.pool = ThreadPool.open(self.ctx, n_threads)
                if self.pool is not None:
                    self.pool.use(n_threads)
        except BaseException:
            self.free()
            raise

    def set_threads(self, n: int) -> None:
        """Decode with ``n`` threads from the next decode on (prompts too)."""
        self.L.llama_set_n_threads(self.ctx, n, n)
        if self.pool is not None:
            self.pool.use(n)

    def free(self) -> None:
        L = self.L
        if self.pool is not None:
            self.pool.close()  # before the context it is attached to goes
            self.pool = None
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.abort is not None:
            self.abort.close()
        self.abort = None  # its callback may go only once no context can call it
        if self.model and self._owns_model:
            L.llama_model_free(self.model)
        self.model = None

    # --- tokens ------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        L, raw = self.L, text.encode("utf-8")
        n_max = len(raw) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        # Remembered: the engine thread asks once per generated token, and a dictionary
        # lookup is ~50x cheaper than the ctypes call (a vocabulary's pieces are < 10 MB).
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            L = self.L
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            piece = self._pieces[key] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self.L.llama_vocab_is_eog(self.vocab, token))
        return eog
