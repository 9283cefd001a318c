"""Speculative decoding in the batching engine: drafts, and when they pay.

A sequence that drafts feeds its last token plus ``d`` guessed tokens in one step, with
logits on every row; the engine then samples each row with the sequence's own sampler
(``BatchEngine._verify``) and keeps tokens while the sample equals the guess, so every
emitted token is what plain decoding would have sampled there (one sampler call, one
random draw per emitted token: seeded answers stay the same), and rejected rows are cut
from the cache (``llama_memory_seq_rm``).

- ``PromptLookup``: guesses from the sequence's own tokens (prompt and answer so far): the
  longest recent n-gram that ends the sequence and occurred before, and what followed it;
  once copying, it keeps to the place it copies from. No second model; pays when answers
  repeat their prompt (editing code, quoting).
- ``DraftModel`` (``engine.draft_model``): a smaller model with the same vocabulary.
- ``Speculator``: the engine's hooks. Per sequence it estimates how often guesses are right
  (``DraftStats``, kept current even while not drafting: prompt-lookup guesses cost nothing
  to check against the tokens that do come), and per step it picks the draft length that
  gives the most tokens per second from the measured time of steps with more rows
  (``StepCosts``); zero when drafting would be slower.

Batched sequences draft the same number of tokens in a step (or none): llama.cpp splits a
batch whose sequences bring different row counts into several graph runs, and may leave
one sequence's row alone in one of them, where its numbers differ (``BatchEngine._step``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import attrs

from nexa_llama_cpp.engine.threads import context_class

if TYPE_CHECKING:
    from nexa_llama_cpp.engine.records import Running

MAX_DRAFT = 16
"""Most tokens one sequence guesses in a step."""
EXPLORE_EVERY = 32
"""A step with good guesses that the costs say to skip, or to take shorter than the
guesses go, is taken anyway (longer) this often, so that a cost measured on a bad moment
(another process took the core), or one measured only a few times, is measured again: the
fastest of few measurements overstates a step, and a length never tried again would keep
that figure for good."""


class Drafter(Protocol):
    free_to_check: bool
    """Whether a guess costs nothing to make (so it can be checked even when not used)."""
    guess_seconds: float
    """What guessing one more token costs (one batched decode of the drafter); 0 if nothing."""

    def propose(self, wanted: Sequence[tuple[Running, DraftStats, int]]) -> list[list[int]]:
        """Up to ``n`` guessed tokens for each (sequence, its stats, n)."""
        ...

    def moved(self, src: int, dst: int) -> None:
        """The engine moved a running sequence from id ``src`` to ``dst``."""
        ...

    def close(self) -> None: ...


@attrs.define(eq=False)
class DraftStats:
    """One sequence's drafting record: its tokens so far and how its guesses fared."""

    history: list[int]
    """Prompt and generated tokens, in order."""
    hits: float = 1.0
    misses: float = 1.0
    """Recent right and wrong guesses (decayed; start at one each: p = 0.5)."""
    shadow: list[int] = attrs.field(factory=list)
    """A guess not fed to the model, checked against the tokens that come (free drafters)."""
    drafted: int = 0
    accepted: int = 0
    trial_after: int = 0
    """For costly drafters: the generated count after which drafting is tried again."""
    ngrams: dict[int, dict[tuple[int, ...], int]] = attrs.field(factory=dict)
    """``PromptLookup``'s index: by n-gram size, each n-gram of ``history`` and where its
    latest occurrence ends, for the n-grams that end before ``history``'s last token."""
    indexed: int = 0
    """The ``history`` length up to which ``ngrams`` is current."""
    source: int = -1
    """``PromptLookup``: where in ``history`` its last guess was copied from (-1: none), as
    of ``history`` being ``source_at`` long."""
    source_at: int = 0

    DECAY = 0.9

    @property
    def p(self) -> float:
        """Estimated chance that a guessed token is right (given the ones before it were)."""
        return self.hits / (self.hits + self.misses)

    def record(self, accepted: int, rejected: bool) -> None:
        """``accepted`` guesses were right, then (``rejected``) one was wrong."""
        for right in [True] * accepted + [False] * rejected:
            self.hits = self.hits * self.DECAY + right
            self.misses = self.misses * self.DECAY + (not right)

    def append(self, token: int) -> None:
        self.history.append(token)
        if self.shadow:
            if token == self.shadow[0]:
                self.shadow.pop(0)
                self.record(1, False)
            else:
                self.shadow.clear()
                self.record(0, True)


def expected_tokens(p: float, d: int) -> float:
    """Tokens one step emits with ``d`` guesses each right with chance ``p``: 1 + p + ... + p^d."""
    return sum(p**i for i in range(d + 1))


class StepCosts:
    """The fastest measured time of a generation step by (threads, sequences, context
    class, rows per sequence). A step with more rows is priced against a one-row step of
    the same context class (a long context makes every row dearer: a ratio of a long
    context's rows to a short context's one row would overprice drafting where answers
    copy a long prompt), from the measurements at the thread count in use (interpolated,
    or extrapolated from the last two), else at the nearest other class or count, else
    from ``PRIOR_ROW_COST``: the first guessed steps then measure it."""

    PRIOR_ROW_COST = 0.4
    """What one more row adds to a one-row step before anything was measured (an extra
    row costs more on small models, whose steps are compute-bound, than on large ones)."""

    def __init__(self) -> None:
        self._best: dict[tuple[int, int, int, int], float] = {}
        self._curves: dict[tuple[int, int, int], tuple[list[int], list[float]]] = {}
        """By (threads, sequences, context class): the measured row counts, ascending, and
        the fastest time of each (from ``_best``; rebuilt only when a new fastest time
        comes, as the policy reads it every step)."""

    def observe(self, threads: int, n_seq: int, rows: int, seconds: float, context: int = 0) -> None:
        """A step of ``rows`` rows per sequence over ``context`` cached tokens took ``seconds``."""
        cls = context_class(context)
        key = (threads, n_seq, cls, rows)
        if seconds < self._best.get(key, float("inf")):
            self._best[key] = seconds
            points = sorted((r, t) for (th, n, c, r), t in self._best.items() if (th, n, c) == (threads, n_seq, cls))
            self._curves[(threads, n_seq, cls)] = ([r for r, _t in points], [t for _r, t in points])

    def seconds(self, threads: int, n_seq: int, rows: int, context: int = 0) -> float | None:
        """The fastest such step at the nearest context class measured, None if none."""
        cls = context_class(context)
        found = [(abs(c - cls), t) for (th, n, c, r), t in self._best.items() if (th, n, r) == (threads, n_seq, rows)]
        return min(found)[1] if found else None

    def ratio(self, threads: int, n_seq: int, rows: int, context: int = 0) -> float:
        """Time of a step with ``rows`` rows per sequence over one with one row (>= 1)."""
        if rows <= 1:
            return 1.0
        cls = context_class(context)
        curves = sorted((k for k in self._curves if k[1] == n_seq),
                        key=lambda k: (abs(k[2] - cls), abs(k[0] - threads), k[0], k[2]))
        for key in curves:
            found = self._ratio_at(key, rows)
            if found is not None:
                return max(1.0, found)
        return 1.0 + self.PRIOR_ROW_COST * (rows - 1)

    def _ratio_at(self, key: tuple[int, int, int], rows: int) -> float | None:
        rs, ts = self._curves.get(key, ((), ()))
        if len(rs) < 2 or rs[0] != 1:
            return None
        i = bisect.bisect_left(rs, rows)  # >= 1: rows > 1 = rs[0]
        if i < len(rs) and rs[i] == rows:
            return ts[i] / ts[0]
        if i < len(rs):  # between two measured row counts
            r0, t0, r1, t1 = rs[i - 1], ts[i - 1], rs[i], ts[i]
            return (t0 + (t1 - t0) * (rows - r0) / (r1 - r0)) / ts[0]
        r0, t0, r1, t1 = rs[-2], ts[-2], rs[-1], ts[-1]  # beyond them: the last two's slope
        return (t1 + max(0.0, (t1 - t0) / (r1 - r0)) * (rows - r1)) / ts[0]


class PromptLookup:
    """Guesses the continuation of a sequence from its own earlier tokens (n-gram lookup)."""

    free_to_check = True
    guess_seconds = 0.0

    def __init__(self, ngram_sizes: Sequence[int] = (4, 3, 2)) -> None:
        self.ngram_sizes = tuple(ngram_sizes)

    def propose(self, wanted: Sequence[tuple[Running, DraftStats, int]]) -> list[list[int]]:
        return [self.lookup(stats, n) for _seq, stats, n in wanted]

    def lookup(self, stats: DraftStats, n: int) -> list[int]:
        """What follows the place the last guess came from, while the tokens since agree with
        it; else what followed the most recent earlier occurrence of the longest n-gram
        ending the tokens."""
        if n <= 0:
            return []
        h = stats.history
        length = len(h)
        if stats.source >= 0:
            # Code repeats its lines (two methods that raise alike): the latest occurrence of
            # the tail would jump to the other one, a wrong guess wherever the answer copies
            # the earlier place.
            at = stats.source + length - stats.source_at
            size = max(self.ngram_sizes)
            if size <= at < length and h[at - size : at] == h[length - size :]:
                stats.source, stats.source_at = at, length
                return h[at : min(at + n, length)]
        self._index(stats)
        for size in self.ngram_sizes:
            if length <= size:
                continue
            end = stats.ngrams[size].get(tuple(h[length - size :]))
            if end is not None:
                stats.source, stats.source_at = end, length
                return h[end : min(end + n, length)]
        stats.source = -1
        return []

    def _index(self, stats: DraftStats) -> None:
        """Bring ``stats.ngrams`` up to date: every n-gram ending before the last token, mapped
        to where its latest occurrence ends. Kept as the tokens come (a dictionary lookup a
        step) rather than scanning the whole history each step, which cost ~0.2 ms a token
        on a short prompt and grows with the prompt."""
        h = stats.history
        last = len(h) - 1  # n-grams ending at positions up to here (exclusive end)
        first = stats.indexed
        if last <= first:
            return
        for size in self.ngram_sizes:
            table = stats.ngrams.setdefault(size, {})
            lo = max(first + 1, size)  # ends lo..last; an end below size has no n-gram
            if lo > last:
                continue
            window = h[lo - size : last]
            grams = zip(*(window[j:] for j in range(size)), strict=False)
            # Later occurrences overwrite earlier ones: the latest wins.
            table.update(zip(grams, range(lo, last + 1), strict=False))
        stats.indexed = last

    def moved(self, src: int, dst: int) -> None:
        pass

    def close(self) -> None:
        pass


class Speculator:
    """The engine's drafting: which sequences guess how many tokens in a step.

    ``drafter`` makes the guesses; ``threads()`` is the engine's current decode thread
    count (step costs are measured per count).
    """

    def __init__(
        self,
        drafter: Drafter,
        threads: Callable[[], int],
        *,
        max_draft: int = MAX_DRAFT,
        max_rows: int = 512,
        fixed: int | None = None,
    ) -> None:
        self.drafter = drafter
        self.costs = StepCosts()
        self._threads = threads
        self.max_draft = max_draft
        self.max_rows = max_rows
        self.fixed = fixed
        """Guess this many tokens whenever there are guesses, whatever they cost (tests and
        benchmarks); None: as many as pay."""
        self.drafted = 0
        self.accepted = 0
        self._held_back = 0

    # --- per sequence -----------------------------------------------------------------

    def stats(self, seq: Running) -> DraftStats:
        """``seq``'s drafting record, made from its tokens when it first generates."""
        if seq.drafts is None:
            seq.drafts = DraftStats(history=[*seq.slot.tokens, *seq.pending])
        return seq.drafts

    def emitted(self, seq: Running, token: int) -> None:
        """A token ``seq`` generated (and will feed next)."""
        if seq.drafts is not None:
            seq.drafts.append(token)

    # --- per step ---------------------------------------------------------------------

    def plan(self, generating: Sequence[Running]) -> list[list[int]] | None:
        """Each generating sequence's guesses for this step (all of one length), or None."""
        if not generating:
            return None
        n = len(generating)
        wanted = []
        for seq in generating:
            stats = self.stats(seq)
            room = seq.job.max_new - seq.n_generated - 1  # never guess past max_tokens
            cap = min(self.max_draft, room, self.max_rows // n - 1)
            if cap <= 0:
                return None
            if not self.drafter.free_to_check and seq.n_generated < stats.trial_after:
                return None
            wanted.append((seq, stats, cap))
        ps = [stats.p for _seq, stats, _cap in wanted]
        context = max(len(seq.slot.tokens) for seq in generating)
        if self.drafter.free_to_check:
            guesses = self.drafter.propose(wanted)
            longest = min(len(g) for g in guesses)
            d = self._best_length(n, ps, longest, context)
            if d < longest and longest >= 2 and min(ps) >= 0.5 and self.fixed is None:
                self._held_back += 1
                if self._held_back % EXPLORE_EVERY == 0:
                    d = min(longest, max(4, 2 * d + 1))
            if d == 0:
                for (_seq, stats, _cap), guess in zip(wanted, guesses, strict=True):
                    stats.shadow = guess[:]  # checked against the tokens that do come
                return None
        else:
            # Guesses cost decodes here: decide how many first, and skip them when they
            # would not pay; try again after a while (the chances may have changed).
            d = self._best_length(n, ps, min(cap for _seq, _stats, cap in wanted), context)
            if d == 0:
                for seq, stats, _cap in wanted:
                    stats.trial_after = seq.n_generated + 16 + stats.drafted // 4
                return None
            guesses = self.drafter.propose([(seq, stats, d) for seq, stats, _cap in wanted])
            d = min(len(g) for g in guesses)
            if d == 0:
                return None
        return [g[:d] for g in guesses]

    def _best_length(self, n_seq: int, ps: Sequence[float], longest: int, context: int = 0) -> int:
        """The guesses per sequence that give the most tokens per unit of time (0: none)."""
        if self.fixed is not None:
            return min(self.fixed, longest)
        threads = self._threads()
        step = self.costs.seconds(threads, n_seq, 1, context)
        guess = self.drafter.guess_seconds / step if step else 0.0
        best_d, best_rate = 0, float(n_seq)
        for d in range(1, longest + 1):
            cost = self.costs.ratio(threads, n_seq, 1 + d, context) + d * guess
            rate = sum(expected_tokens(p, d) for p in ps) / cost
            if rate > best_rate * 1.02:  # a clear gain only
                best_d, best_rate = d, rate
        return best_d

    def verified(self, seq: Running, drafted: int, accepted: int, finished: bool) -> None:
        """``drafted`` guesses of ``seq`` were checked and the first ``accepted`` kept."""
        stats = self.stats(seq)
        stats.drafted += drafted
        stats.accepted += accepted
        stats.shadow.clear()
        # A sequence that ended inside its guesses says nothing about the rest of them.
        stats.record(accepted, rejected=accepted < drafted and not finished)
        self.drafted += drafted
        self.accepted += accepted

    def observe_step(self, n_seq: int, rows: int, seconds: float, context: int = 0) -> None:
        self.costs.observe(self._threads(), n_seq, rows, seconds, context)

    def moved(self, src: int, dst: int) -> None:
        self.drafter.moved(src, dst)

    def close(self) -> None:
        self.drafter.close()
