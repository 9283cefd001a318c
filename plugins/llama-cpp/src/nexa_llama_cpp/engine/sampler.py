"""How one sequence of the batching engine picks its next token.

``Sampler`` is llama.cpp's sampler chain built from core's ``nexa.types.Sampling``
(penalties, then greedy or top-k / top-p / min-p / temperature / a seeded draw), plus an
optional grammar sampler (GBNF, lazy when it has trigger patterns). Each sequence owns
one, so requests batched together never share sampling state or random numbers.
"""

from __future__ import annotations

import ctypes
import math
import random
from collections.abc import Sequence
from typing import Any

from nexa.errors import BadRequest
from nexa.types import Sampling

PENALTY_LAST_N = 64
"""Recent tokens the repetition, frequency and presence penalties look at (llama.cpp's
default ``repeat_last_n``)."""


class Sampler:
    """One sequence's sampler chain and grammar sampler (owned C objects; ``free`` them)."""

    def __init__(
        self,
        lib: Any,
        vocab: Any,
        n_vocab: int,
        sampling: Sampling,
        grammar: str | None = None,
        grammar_triggers: Sequence[str] = (),
    ) -> None:
        self._lib = lib
        self.n_vocab = n_vocab
        self.chain = None
        self.grammar = None
        L = lib
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self.chain = chain
        s = sampling
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            L.llama_sampler_chain_add(
                chain,
                L.llama_sampler_init_penalties(
                    n_vocab,
                    PENALTY_LAST_N,
                    float(s.repeat_penalty),
                    float(s.frequency_penalty),
                    float(s.presence_penalty),
                ),
            )
        if s.greedy:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            self.seed = None
        else:
            if s.top_k:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(int(s.top_k)))
            if s.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(float(s.top_p), 1))
            if s.min_p:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(float(s.min_p), 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(float(s.temperature)))
            # The seed is drawn here, not left to llama.cpp's random default, so that
            # every sequence owns a reproducible RNG stream.
            self.seed = s.seed if s.seed is not None else random.getrandbits(32)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(self.seed & 0xFFFFFFFF))
        if grammar is not None:
            text = grammar.encode("utf-8")
            if grammar_triggers:
                patterns = [p.encode("utf-8") for p in grammar_triggers]
                arr = (ctypes.c_char_p * len(patterns))(*patterns)
                self.grammar = L.llama_sampler_init_grammar_lazy_patterns(
                    vocab, text, b"root", arr, len(patterns), None, 0
                )
            else:
                self.grammar = L.llama_sampler_init_grammar(vocab, text, b"root")
            if not self.grammar:
                self.free()
                raise BadRequest("the grammar for this request could not be parsed", param="grammar")

    def sample(self, ctx: Any, idx: int, scratch: Scratch) -> int:
        """The next token from the logits of batch row ``idx`` (accepted into the chain)."""
        if self.grammar is None:
            return self._lib.llama_sampler_sample(self.chain, ctx, idx)
        return self._sample_grammar(ctx, idx, scratch)

    def _sample_grammar(self, ctx: Any, idx: int, scratch: Scratch) -> int:
        """Sample, then check the token against the grammar; only when it is rejected run
        the grammar over the whole vocabulary (llama.cpp's common_sampler does the same:
        the full pass costs milliseconds per token on a large vocabulary)."""
        import numpy as np

        L, nv = self._lib, self.n_vocab
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(nv,))
        cand = scratch.candidates

        def run(with_grammar: bool) -> int:
            cand["id"] = scratch.ids
            cand["logit"] = logits
            cand["p"] = 0.0
            arr = L.llama_token_data_array(
                data=cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)),
                size=nv,
                selected=-1,
                sorted=False,
            )
            if with_grammar:
                L.llama_sampler_apply(self.grammar, ctypes.byref(arr))
            L.llama_sampler_apply(self.chain, ctypes.byref(arr))
            return int(arr.data[arr.selected].id)

        token = run(False)
        one = L.llama_token_data(id=token, logit=1.0, p=0.0)
        one_arr = L.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
        L.llama_sampler_apply(self.grammar, ctypes.byref(one_arr))
        if math.isinf(one.logit) and one.logit < 0:
            token = run(True)
        L.llama_sampler_accept(self.grammar, token)
        L.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            self._lib.llama_sampler_free(self.grammar)
            self.grammar = None


class Scratch:
    """A candidate array over the whole vocabulary, shared by the sequences of one engine
    (the engine thread samples one sequence at a time) so grammar sampling allocates nothing."""

    def __init__(self, lib: Any, n_vocab: int) -> None:
        import numpy as np

        dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        assert dtype.itemsize == ctypes.sizeof(lib.llama_token_data)
        self.candidates = np.zeros(n_vocab, dtype=dtype)
        self.ids = np.arange(n_vocab, dtype=np.int32)
