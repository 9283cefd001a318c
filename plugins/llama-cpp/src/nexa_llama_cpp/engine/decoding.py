"""How one engine step's batch is built, decoded, sampled and verified (a ``BatchEngine`` mixin).

- ``_decode``: prompt tokens, one sequence's bite (or several short prompts); the last
  prompt token is sampled from.
- ``_generate``: every generating sequence's next token in one batch, plus its guesses
  when drafting pays; ``_verify`` keeps sampled tokens while they equal the guesses.
- ``_run_batch``: the ``llama_decode`` itself, at the thread count ``engine.threads``
  picks, timed for it; a prompt decode can be aborted mid-graph.
- ``_sample_and_emit``/``_finish``: a sequence's sampler on one row, its text held for the
  consumer; ``_deliver`` hands what one sequence made in a step over in one call, so a
  guessed step's tokens reach the consumer together (one wake-up and one streamed chunk
  instead of one per token: docs/benchmarks.md, "Sixth pass").

What runs in a step and when is ``engine.scheduler``; this is only how.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nexa_llama_cpp.engine.records import Finished, Job, Running, TextPiece
from nexa_llama_cpp.engine.sampler import Scratch, logits_view
from nexa_llama_cpp.engine.threads import generation_shape, prompt_shape

if TYPE_CHECKING:
    from nexa_llama_cpp.engine.context import EngineContext
    from nexa_llama_cpp.engine.records import Event
    from nexa_llama_cpp.engine.slots import SlotTable
    from nexa_llama_cpp.engine.speculative import Speculator
    from nexa_llama_cpp.engine.threads import ThreadGovernor


class Decoding:
    """The decode-and-sample half of ``BatchEngine`` (engine thread only)."""

    _c: EngineContext | None
    _kv: SlotTable | None
    _governor: ThreadGovernor | None
    _spec: Speculator | None
    _scratch: Scratch | None
    _counters: dict[str, int]
    n_vocab: int

    def _emit(self, job: Job, events: Sequence[Event | BaseException]) -> None: ...  # the scheduler's

    def _release(self, seq: Running) -> None: ...  # the scheduler's

    def _decode(self, feeds: list[tuple[Running, int]], abort: Callable[[], bool] | None = None) -> bool:
        """One ``llama_decode`` of prompt tokens: the next ``k`` pending tokens of each
        sequence given; a prompt's last token is sampled from.

        With ``abort``, the decode stops mid-graph once it returns true; then False is
        returned and the sequences' caches hold exactly what their ``slot.tokens`` say.
        """
        c = self._c
        assert c is not None
        batch = c.batch
        n = 0
        for seq, k in feeds:
            pos0 = len(seq.slot.tokens)
            # Logits only where a token gets sampled: the prompt's last.
            last = k == len(seq.pending)
            for j in range(k):
                self._put(n, seq.pending[j], pos0 + j, seq.slot.seq_id, last and j == k - 1)
                n += 1
            seq.i_batch = n - 1 if last else -1
        batch.n_tokens = n
        context = max(len(seq.slot.tokens) for seq, _k in feeds) + n
        if not self._run_batch(prompt_shape(n, context), n, [seq for seq, _k in feeds], abort):
            return False
        for seq, k in feeds:
            seq.slot.tokens.extend(seq.pending[:k])
            del seq.pending[:k]
            seq.n_prompt_left -= k
            self._counters["prompt_tokens_evaluated"] += k
        for seq, _k in feeds:
            if seq.i_batch >= 0:
                # Kept for the same prompt again (SlotTable.place): ~0.2-0.6 MB copied once
                # per prompt, against a decode step saved on every repeat.
                seq.slot.keep_logits(logits_view(c.L, c.ctx, seq.i_batch, self.n_vocab))
                token = self._sample_and_emit(seq)
                self._deliver(seq)
                if token is not None:
                    seq.pending.append(token)
        return True

    def _start_from_kept_logits(self, seq: Running) -> None:
        """The first token of a sequence whose whole prompt was cached with the logits that
        follow it (``Slot.logits``): sampled from those, with nothing decoded."""
        token = self._sample_and_emit(seq, logits=seq.slot.logits)
        self._deliver(seq)
        if token is not None:
            seq.pending.append(token)

    def _generate(self, generating: list[Running]) -> None:
        """One decode step of every generating sequence: its last token, plus the same
        number of guessed tokens each when drafting pays (``engine.speculative``); then
        each sequence keeps its sampled tokens while they equal the guesses (``_verify``)."""
        c = self._c
        assert c is not None
        drafts = self._spec.plan(generating) if self._spec is not None else None
        feeds = [[seq.pending[0], *(drafts[i] if drafts else ())] for i, seq in enumerate(generating)]
        n = 0
        for seq, feed in zip(generating, feeds, strict=True):
            pos0 = len(seq.slot.tokens)
            seq.i_batch = n
            for j, token in enumerate(feed):
                self._put(n, token, pos0 + j, seq.slot.seq_id, True)
                n += 1
        c.batch.n_tokens = n
        rows = len(feeds[0])
        cached = max(len(seq.slot.tokens) for seq in generating)
        started = time.perf_counter()
        self._run_batch(generation_shape(len(generating), rows, cached + rows), 1, generating, None)
        if self._spec is not None:
            self._spec.observe_step(len(generating), rows, time.perf_counter() - started, cached)
        for seq, feed in zip(generating, feeds, strict=True):
            seq.slot.tokens.extend(feed)
            seq.pending.clear()
            self._verify(seq, feed)

    def _verify(self, seq: Running, feed: list[int]) -> None:
        """Sample ``seq``'s rows in order, keeping tokens while each equals the guess fed
        after it; cut the cells of the guesses that were wrong."""
        guesses = feed[1:]
        first = seq.i_batch
        kept = 0
        alive = True
        for j in range(len(feed)):
            seq.i_batch = first + j
            token = self._sample_and_emit(seq)
            if token is None:
                alive = False
                break
            if j < len(guesses) and token == guesses[j]:
                kept += 1
                continue
            seq.pending.append(token)
            break
        self._deliver(seq)
        seq.i_batch = -1
        slot = seq.slot
        valid = len(slot.tokens) - len(guesses) + kept
        if valid < len(slot.tokens):
            assert self._c is not None
            self._c.L.llama_memory_seq_rm(self._c.memory, slot.seq_id, valid, -1)
            slot.cut(valid)
        if guesses and self._spec is not None:
            self._spec.verified(seq, len(guesses), kept, finished=not alive)
            self._counters["tokens_drafted"] += len(guesses)
            self._counters["tokens_accepted"] += kept

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._c.batch  # type: ignore[union-attr]
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _run_batch(
        self, shape: Any, per: int, seqs: Sequence[Running], abort: Callable[[], bool] | None
    ) -> bool:
        """``llama_decode`` the filled batch, at the thread count the governor picks, and
        tell it how long it took. False when ``abort`` stopped it (each sequence's cells are
        cut back to its ``slot.tokens``)."""
        c, kv, governor = self._c, self._kv, self._governor
        assert c is not None and kv is not None and governor is not None
        L = c.L
        governor.before_decode()
        armed = c.abort.armed(abort) if abort is not None and c.abort is not None else None
        with armed or contextlib.nullcontext():
            started = time.perf_counter()
            ret = L.llama_decode(c.ctx, c.batch)
            seconds = time.perf_counter() - started
            if ret == 1:
                # No room in the cache (the budget should prevent this): drop the idle
                # prefix caches and try once more; a failed call leaves the cache unchanged.
                kv.clear_idle()
                ret = L.llama_decode(c.ctx, c.batch)
        if ret == 2 and abort is not None:
            # Aborted: cut each sequence back to its known cached tokens (llama.cpp drops
            # the aborted ubatch's cells itself; this also covers earlier ubatches).
            for seq in seqs:
                L.llama_memory_seq_rm(c.memory, seq.slot.seq_id, len(seq.slot.tokens), -1)
                seq.i_batch = -1
            return False
        if ret != 0:
            raise RuntimeError(f"llama_decode failed with status {ret}")
        self._counters["decode_steps"] += 1
        governor.observe(shape, seconds, per)
        return True

    def _sample_and_emit(self, seq: Running, logits: Any = None) -> int | None:
        """Sample ``seq``'s row ``i_batch`` (or the given ``logits``) and hold the token's
        text for the consumer (``_deliver``); the token, or None when the sequence finished
        (end of generation, or its length: then it is delivered)."""
        c, job = self._c, seq.job
        assert c is not None
        if self._scratch is None and (logits is not None or job.sampler.needs_scratch):
            self._scratch = Scratch(c.L, self.n_vocab)
        token = job.sampler.sample(c.ctx, seq.i_batch, self._scratch, logits=logits)
        if c.is_eog(token):
            self._finish(seq, "stop")
            return None
        seq.n_generated += 1
        seq.n_unreported += 1
        self._counters["tokens_generated"] += 1
        text = seq.decoder.decode(c.token_bytes(token, special=job.request.render_special))
        if text or job.request.logprobs is not None and seq.n_generated >= job.max_new:
            # With logprobs, the records of a character cut short by the length go too.
            seq.held.append(TextPiece(text, seq.n_unreported, job.sampler.take_logprobs()))
            seq.n_unreported = 0
        if seq.n_generated >= job.max_new:
            self._finish(seq, "length")
            return None
        if self._spec is not None:
            self._spec.emitted(seq, token)
        return token

    def _finish(self, seq: Running, reason: str) -> None:
        job = seq.job
        # The bytes of a character the generation ended inside (max_tokens cut it) are
        # dropped: its last bytes were never generated, and U+FFFD would be text the model
        # never wrote.
        seq.decoder.reset()
        self._release(seq)
        self._counters["requests_finished"] += 1
        seq.held.append(
            Finished(
                finish_reason=reason,
                prompt_tokens=len(job.request.prompt_tokens),
                completion_tokens=seq.n_generated,
                cached_tokens=seq.n_reused,
            )
        )
        self._deliver(seq)

    def _deliver(self, seq: Running) -> None:
        """Hand ``seq``'s held events to its consumer, in one call."""
        if seq.held:
            events, seq.held = seq.held, []
            self._emit(seq.job, events)
