"""How one sequence of the batching engine picks its next token, and what it reports about it.

``Sampler`` is llama.cpp's sampler chain built from core's ``nexa.types.Sampling``
(the logit bias, penalties, then greedy or top-k / top-p / min-p / temperature / a seeded
draw), plus an optional grammar sampler (GBNF, lazy when it has trigger patterns). Each
sequence owns one, so requests batched together never share sampling state or random
numbers. The image path (``vision``) samples with it too.

Beyond sampling it can:

- report each token's log-probability and the most likely alternatives
  (``nexa.types.TokenLogprob``): the log-softmax of the logits after the logit bias and
  the penalties, before temperature and the top-k/top-p/min-p cuts (as MLX's, and
  OpenAI's, whose logprobs move with ``logit_bias``); a grammar's masking is not applied
  to them. A separate chain of the same bias and penalties computes them, so asking for
  logprobs never changes the text;
- force tokens instead of sampling: ``steer`` is told each chosen token and returns the
  tokens that must come next (a thinking budget forcing the close of the thought). Forced
  tokens go through the chain's history (penalties) as if sampled.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from nexa.errors import BadRequest
from nexa.types import Sampling, TokenLogprob

PENALTY_LAST_N = 64
"""Recent tokens the repetition, frequency and presence penalties look at (llama.cpp's
default ``repeat_last_n``)."""


class Sampler:
    """One sequence's sampler chain and grammar sampler (owned C objects; ``free`` them).

    ``logprobs``: None, or how many alternatives each token's record lists (0..20); the
    records then need ``token_bytes`` (a token's text as the consumer shows it) and are
    collected by ``take_logprobs``. ``steer``: called with every chosen token (forced ones
    too); returns the tokens to force next (usually none).
    """

    def __init__(
        self,
        lib: Any,
        vocab: Any,
        n_vocab: int,
        sampling: Sampling,
        grammar: str | None = None,
        grammar_triggers: Sequence[str] = (),
        *,
        logprobs: int | None = None,
        token_bytes: Callable[[int], bytes] | None = None,
        steer: Callable[[int], Sequence[int]] | None = None,
    ) -> None:
        self._lib = lib
        self.n_vocab = n_vocab
        self.chain = None
        self.grammar = None
        self.adjust = None
        """The bias and penalties alone, for the logprobs' view of the logits (None: the raw logits)."""
        self.logprobs = logprobs
        self._token_bytes = token_bytes
        self._steer = steer
        self._forced: collections.deque[int] = collections.deque()
        self._records: list[TokenLogprob] = []
        L = lib
        bias = check_logit_bias(sampling, n_vocab)
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self.chain = chain
        self._add_adjustments(chain, sampling, bias)
        if logprobs is not None and (bias or _penalised(sampling)):
            self.adjust = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            self._add_adjustments(self.adjust, sampling, bias)
        s = sampling
        self.argmax_only = s.greedy and not bias and not _penalised(s) and grammar is None
        """The chain is greedy alone: the choice is the logits' first maximum, which numpy
        finds in ~10 us where ``llama_sampler_sample`` copies the vocabulary into a
        candidate array first (~100-200 us a token on a 49k vocabulary)."""
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

    def _add_adjustments(self, chain: Any, s: Sampling, bias: list[tuple[int, float]]) -> None:
        """The logit bias, then the penalties: what changes the logits before any choice."""
        L = self._lib
        if bias:
            entries = (L.llama_logit_bias * len(bias))(*(L.llama_logit_bias(token=t, bias=b) for t, b in bias))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(self.n_vocab, len(bias), entries))
        if _penalised(s):
            L.llama_sampler_chain_add(
                chain,
                L.llama_sampler_init_penalties(
                    self.n_vocab,
                    PENALTY_LAST_N,
                    float(s.repeat_penalty),
                    float(s.frequency_penalty),
                    float(s.presence_penalty),
                ),
            )

    def sample(self, ctx: Any, idx: int, scratch: Scratch | None, logits: Any = None) -> int:
        """The next token from the logits of batch row ``idx`` (or the float32 array
        ``logits``, kept from an earlier decode; then ``scratch`` is needed), accepted into
        the chain: a forced one when ``steer`` asked for it, else sampled. Its logprob
        record, when asked for, waits in ``take_logprobs``."""
        if self.logprobs is not None:
            view = self._logprob_view(self._logits(ctx, idx, logits), scratch)
        if self._forced:
            token = self._forced.popleft()
            self._lib.llama_sampler_accept(self.chain, token)
            if self.grammar is not None:
                self._lib.llama_sampler_accept(self.grammar, token)
        elif self.argmax_only:
            # Greedy's accept changes nothing, so the chain need not see the token.
            token = int(self._logits(ctx, idx, logits).argmax())
        elif self.grammar is None and logits is None:
            token = self._lib.llama_sampler_sample(self.chain, ctx, idx)
        else:
            assert scratch is not None
            token = self._sample_candidates(self._logits(ctx, idx, logits), scratch)
        if self.logprobs is not None:
            if self.adjust is not None:
                self._lib.llama_sampler_accept(self.adjust, token)
            self._records.append(self._record(view, token))
        if self._steer is not None:
            self._forced.extend(self._steer(token))
        return token

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The records of the tokens sampled since the last call."""
        records, self._records = tuple(self._records), []
        return records

    # --- log-probabilities ----------------------------------------------------------------

    def _logits(self, ctx: Any, idx: int, kept: Any) -> Any:
        """The logits sampled from: ``kept``, else batch row ``idx``'s (a view)."""
        return kept if kept is not None else logits_view(self._lib, ctx, idx, self.n_vocab)

    def _logprob_view(self, logits: Any, scratch: Scratch | None) -> Any:
        """Log-softmax over the vocabulary of ``logits`` after bias and penalties."""
        import numpy as np

        L, nv = self._lib, self.n_vocab
        if self.adjust is not None:
            assert scratch is not None
            cand = scratch.candidates
            cand["id"] = scratch.ids
            cand["logit"] = logits
            arr = L.llama_token_data_array(
                data=cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=nv, selected=-1, sorted=False
            )
            # Bias and penalties change logits in place and keep the vocabulary's order.
            L.llama_sampler_apply(self.adjust, ctypes.byref(arr))
            logits = cand["logit"]
        values = logits.astype(np.float64)
        top = float(values.max())
        return values - (top + math.log(float(np.exp(values - top).sum())))

    def _record(self, view: Any, token: int) -> TokenLogprob:
        import numpy as np

        top: tuple[tuple[str, float], ...] = ()
        n = min(self.logprobs or 0, self.n_vocab)
        if n:
            best = np.argpartition(-view, n - 1)[:n]
            best = best[np.argsort(-view[best], kind="stable")]
            top = tuple((self._text(int(t))[0], _finite(view[t])) for t in best)
        text, raw = self._text(token)
        return TokenLogprob(text, _finite(view[token]), top, raw)

    def _text(self, token: int) -> tuple[str, bytes | None]:
        """A token's text, and its bytes when they are not whole UTF-8 on their own."""
        assert self._token_bytes is not None, "logprobs need token_bytes"
        raw = self._token_bytes(token)
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace"), raw

    def _sample_candidates(self, logits: Any, scratch: Scratch) -> int:
        """Sample from ``logits`` through a candidate array, as ``llama_sampler_sample`` does
        from a batch row (apply the chain, accept its choice). With a grammar: sample, then
        check the token against it; only when it is rejected run the grammar over the whole
        vocabulary (llama.cpp's common_sampler does the same: the full pass costs
        milliseconds per token on a large vocabulary)."""
        L, nv = self._lib, self.n_vocab
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
        if self.grammar is None:
            L.llama_sampler_accept(self.chain, token)
            return token
        one = L.llama_token_data(id=token, logit=1.0, p=0.0)
        one_arr = L.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
        L.llama_sampler_apply(self.grammar, ctypes.byref(one_arr))
        if math.isinf(one.logit) and one.logit < 0:
            token = run(True)
        L.llama_sampler_accept(self.grammar, token)
        L.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        for name in ("chain", "grammar", "adjust"):
            sampler = getattr(self, name)
            if sampler:
                self._lib.llama_sampler_free(sampler)
                setattr(self, name, None)

    @property
    def needs_scratch(self) -> bool:
        """Whether ``sample`` works on a candidate array (``Scratch``) over the vocabulary."""
        return self.grammar is not None or self.adjust is not None


def logits_view(lib: Any, ctx: Any, idx: int, n_vocab: int) -> Any:
    """Batch row ``idx``'s logits as a float32 array over the vocabulary: a view into
    llama.cpp's buffer, valid until the context's next decode."""
    address = _logits_address(lib)(ctx, idx)
    if not address:
        raise RuntimeError(f"llama.cpp has no logits for batch row {idx}")
    view = _ROW_VIEWS.get((address, n_vocab))
    if view is None:
        view = _row_view(address, n_vocab)
    return view


_ROW_VIEWS: dict[tuple[int, int], Any] = {}
"""Views already made, by (address, n_vocab). A row's address repeats every step (llama.cpp
keeps its logits buffer), and making a view costs ~50 us of cold Python right after a
decode (numpy's ``as_array``, measured on the engine thread), per sampled token. A view
only points: it is read only when llama.cpp returns its address again, so it is valid
whenever it is used."""


def _row_view(address: int, n_vocab: int) -> Any:
    import numpy as np

    if len(_ROW_VIEWS) >= 4096:  # bounded: a context's rows are few, but contexts come and go
        _ROW_VIEWS.clear()
    view = np.frombuffer((ctypes.c_float * n_vocab).from_address(address), dtype=np.float32)
    _ROW_VIEWS[(address, n_vocab)] = view
    return view


@functools.cache
def _logits_address(lib: Any) -> Any:
    """``llama_get_logits_ith`` returning the row's address as an int (llama-cpp-python's
    binding returns a ctypes pointer, which costs more to turn into an array)."""
    fn = lib._lib["llama_get_logits_ith"]  # a new function object: the binding's stays as it is
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    fn.restype = ctypes.c_void_p
    return fn


LOGPROB_FLOOR = -9999.0
"""JSON has no -inf: a token ruled out (a bias of -inf) gets OpenAI's floor instead."""


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else LOGPROB_FLOOR


def _penalised(s: Sampling) -> bool:
    return s.repeat_penalty != 1.0 or bool(s.frequency_penalty) or bool(s.presence_penalty)


def check_logit_bias(sampling: Sampling, n_vocab: int) -> list[tuple[int, float]]:
    """``sampling.logit_bias`` as (token, bias) pairs; a token outside the vocabulary is a 400."""
    bad = [t for t in sampling.logit_bias if not 0 <= t < n_vocab]
    if bad:
        raise BadRequest(f"logit_bias names token {bad[0]}; this model's tokens are 0..{n_vocab - 1}",
                         param="logit_bias")
    return [(int(t), float(b)) for t, b in sampling.logit_bias.items()]


class Scratch:
    """A candidate array over the whole vocabulary, shared by the sequences of one engine
    (the engine thread samples one sequence at a time) so grammar sampling allocates nothing."""

    def __init__(self, lib: Any, n_vocab: int) -> None:
        import numpy as np

        dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        assert dtype.itemsize == ctypes.sizeof(lib.llama_token_data)
        self.candidates = np.zeros(n_vocab, dtype=dtype)
        self.ids = np.arange(n_vocab, dtype=np.int32)
