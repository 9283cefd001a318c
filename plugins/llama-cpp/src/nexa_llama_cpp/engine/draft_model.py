"""A draft model for speculative decoding (``nexa serve --draft MODEL``): a smaller model
with the target's vocabulary guesses the next tokens, the target checks them in one step.

``DraftModel`` owns the draft's weights and one llama context with a KV sequence per
engine sequence id, each holding the tokens it last saw for that sequence. Before
guessing it catches each sequence up with the target's tokens (the longest common prefix
is kept; what differs, such as rejected guesses, is cut), then guesses greedily, one
batched decode per guessed token for all the sequences that draft. Its numbers never
reach an answer: the target samples every emitted token itself.
Runs on the engine thread only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nexa.errors import ModelLoadError
from nexa_llama_cpp.engine.context import context_params
from nexa_llama_cpp.engine.records import common_prefix
from nexa_llama_cpp.engine.sampler import logits_view

if TYPE_CHECKING:
    from nexa_llama_cpp.engine.records import Running
    from nexa_llama_cpp.engine.speculative import DraftStats

VOCAB_SIZE_SLACK = 128
"""Vocabularies may differ by this many trailing (unused or added) tokens, as llama.cpp allows."""


class DraftModel:
    free_to_check = False
    guess_seconds = 0.0
    """The fastest decode of one guessed row per sequence seen so far."""

    def __init__(
        self,
        lib: Any,
        path: str,
        *,
        target_vocab: Any,
        n_seq: int,
        n_ctx: int,
        n_threads: int,
        n_gpu_layers: int,
        flash_attn: bool,
        op_offload: bool,
        n_batch: int = 512,
    ) -> None:
        L = self._L = lib
        self.model: Any = None
        self.ctx: Any = None
        self.batch: Any = None
        self.n_batch = n_batch
        try:
            if not os.path.isfile(path):
                raise ModelLoadError(f"draft model file not found: {path}")
            params = L.llama_model_default_params()
            params.n_gpu_layers = n_gpu_layers
            self.model = L.llama_model_load_from_file(path.encode("utf-8"), params)
            if not self.model:
                raise ModelLoadError(f"llama.cpp could not load the draft model {path}")
            self.vocab = L.llama_model_get_vocab(self.model)
            self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
            self.n_target_vocab = L.llama_vocab_n_tokens(target_vocab)
            why = vocab_mismatch(L, target_vocab, self.vocab)
            if why:
                raise ModelLoadError(f"the draft model {os.path.basename(path)} cannot draft for this model: {why}")
            cparams = context_params(L, n_ctx=n_ctx * n_seq, n_batch=n_batch, n_seq=n_seq, n_threads=n_threads,
                                     n_threads_batch=n_threads, kv_unified=False, op_offload=op_offload,
                                     flash_attn=flash_attn)
            self.ctx = L.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise ModelLoadError("llama.cpp could not create the draft model's context (out of memory?)")
            self.memory = L.llama_get_memory(self.ctx)
            self.batch = L.llama_batch_init(n_batch, 0, 1)
        except BaseException:
            self.close()
            raise
        self.tokens: list[list[int]] = [[] for _ in range(n_seq)]
        """What each sequence id's cells hold, positions 0..n-1."""

    def set_threads(self, n: int) -> None:
        self._L.llama_set_n_threads(self.ctx, n, n)

    # --- the Drafter protocol (engine.speculative) ----------------------------------------

    def propose(self, wanted: Sequence[tuple[Running, DraftStats, int]]) -> list[list[int]]:
        rows = self._catch_up([(seq.slot.seq_id, stats) for seq, stats, _n in wanted])
        guesses: list[list[int]] = [[] for _ in wanted]
        live = [i for i, (_seq, _stats, n) in enumerate(wanted) if n > 0]
        while live:
            feed = []
            for i in live:
                token = self._argmax(rows[i])
                if token >= self.n_target_vocab:
                    continue  # a token only the draft has: the target can never sample it
                guesses[i].append(token)
                if len(guesses[i]) < wanted[i][2] and not self._L.llama_vocab_is_eog(self.vocab, token):
                    feed.append(i)
            live = feed
            if live:
                # The guesses just made, one row each, to guess the next ones.
                items = [(wanted[i][0].slot.seq_id, [guesses[i][-1]]) for i in live]
                started = time.perf_counter()
                for i, row in zip(live, self._decode(items), strict=True):
                    rows[i] = row
                seconds = time.perf_counter() - started
                if not self.guess_seconds or seconds < self.guess_seconds:
                    self.guess_seconds = seconds
        return guesses

    def moved(self, src: int, dst: int) -> None:
        L, mem = self._L, self.memory
        L.llama_memory_seq_rm(mem, dst, -1, -1)
        L.llama_memory_seq_cp(mem, src, dst, -1, -1)
        L.llama_memory_seq_rm(mem, src, -1, -1)
        self.tokens[dst], self.tokens[src] = self.tokens[src], []

    def close(self) -> None:
        L = self._L
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    # --- internals ----------------------------------------------------------------------

    def _catch_up(self, seqs: Sequence[tuple[int, DraftStats]]) -> list[int]:
        """Bring each sequence's cells to the target's tokens; the batch row of each one's
        last token (whose logits give its first guess), all from one last decode."""
        L, mem = self._L, self.memory
        lasts = []
        for seq_id, stats in seqs:
            target = stats.history  # read only: no copy of the whole history a step
            have = self.tokens[seq_id]
            keep = min(common_prefix(have, target), len(target) - 1)
            if keep < len(have):
                if not L.llama_memory_seq_rm(mem, seq_id, keep, -1):
                    L.llama_memory_seq_rm(mem, seq_id, -1, -1)
                    keep = 0
                del have[keep:]
            # All but the last token in plain chunks; the last ones together below.
            rest = target[keep:-1]
            for start in range(0, len(rest), self.n_batch):
                self._decode([(seq_id, rest[start : start + self.n_batch])], logits=False)
            lasts.append((seq_id, target[-1:]))
        return self._decode(lasts)

    def _decode(self, items: Sequence[tuple[int, list[int]]], logits: bool = True) -> list[int]:
        """One decode of each (seq_id, tokens) appended to its cells; each item's last row."""
        L, batch = self._L, self.batch
        n = 0
        rows = []
        for seq_id, tokens in items:
            pos0 = len(self.tokens[seq_id])
            for j, t in enumerate(tokens):
                batch.token[n] = t
                batch.pos[n] = pos0 + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = logits and j == len(tokens) - 1
                n += 1
            rows.append(n - 1)
        batch.n_tokens = n
        if n and L.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("the draft model's decode failed")
        for seq_id, tokens in items:
            self.tokens[seq_id].extend(tokens)
        return rows

    def _argmax(self, row: int) -> int:
        return int(logits_view(self._L, self.ctx, row, self.n_vocab).argmax())


def vocab_mismatch(lib: Any, target: Any, draft: Any) -> str | None:
    """Why ``draft``'s vocabulary cannot guess tokens for ``target``'s (None: it can)."""
    L = lib
    n_target, n_draft = L.llama_vocab_n_tokens(target), L.llama_vocab_n_tokens(draft)
    if abs(n_target - n_draft) > VOCAB_SIZE_SLACK:
        return f"its vocabulary has {n_draft} tokens, this model's {n_target}"
    if L.llama_vocab_type(target) != L.llama_vocab_type(draft):
        return "its tokenizer is of another kind"
    for name in ("llama_vocab_bos", "llama_vocab_eos"):
        if getattr(L, name)(target) != getattr(L, name)(draft):
            return f"its {name.rsplit('_', 1)[1].upper()} token differs"
    for token in range(min(n_target, n_draft)):
        if L.llama_vocab_get_text(target, token) != L.llama_vocab_get_text(draft, token):
            return f"token {token} differs"
    return None
