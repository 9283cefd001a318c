"""When the engine drafts, and how much: the speculative-decoding policy on given numbers.

``Speculator`` decides per step from each sequence's acceptance estimate (``DraftStats``)
and the measured step times (``StepCosts``): longer guesses for sequences whose guesses
come true, none when drafting would be slower, back on once the unused guesses it keeps
checking come true again. These tests give it step times and token streams directly (no
model), so each rule is checked exactly; the identity of drafted answers is checked on real
models in test_speculative.py and test_speculative_smollm2.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nexa_llama_cpp.engine.speculative import (
    EXPLORE_EVERY,
    DraftStats,
    PromptLookup,
    Speculator,
    StepCosts,
    expected_tokens,
)

# A prompt whose tail "1 2 3 4" occurred before, followed by 5 6 7 8 9.
REPEATING = [9, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 21, 1, 2, 3, 4]


def sequence(tokens: list[int], max_new: int = 200, generated: int = 0):
    """What the policy reads of a running sequence (the engine's ``Running`` record)."""
    return SimpleNamespace(
        slot=SimpleNamespace(tokens=list(tokens)), pending=[], drafts=None,
        job=SimpleNamespace(max_new=max_new), n_generated=generated,
    )


def cheap_rows(costs: StepCosts, threads: int = 1, n_seq: int = 1, row: float = 0.02) -> None:
    """Measured steps where each extra row adds ``row`` of a one-row step (10 ms)."""
    for rows in (1, 2, 4, 8, 17):
        costs.observe(threads, n_seq, rows, 0.010 * (1 + row * (rows - 1)))


def speculator(drafter=None, **kw) -> Speculator:
    return Speculator(drafter or PromptLookup(), lambda: 1, **kw)


def test_prompt_lookup_continues_the_latest_longest_match():
    stats = DraftStats(history=list(REPEATING))
    assert PromptLookup().lookup(stats, 3) == [5, 6, 7]
    assert PromptLookup().lookup(stats, 100) == [5, 6, 7, 8, 9, 20, 21, 1, 2, 3, 4]  # never past the end
    unseen = DraftStats(history=[1, 2, 3, 4, 5])
    assert PromptLookup().lookup(unseen, 4) == []


def test_prompt_lookup_keeps_copying_from_the_place_it_copies():
    # Two methods that start alike ("7 8 9 10"), then differ ("deposit" 11 / "withdraw" 12).
    # The answer copies the first method: at the shared tail the latest occurrence would
    # guess the second one's 12; the place being copied says 11.
    prompt = [1, 7, 8, 9, 10, 11, 2, 7, 8, 9, 10, 12, 3]
    stats = DraftStats(history=[*prompt, 1, 7])
    lookup = PromptLookup()
    assert lookup.lookup(stats, 3) == [8, 9, 10]  # the copy starts at the first method
    for token in (8, 9, 10):
        stats.append(token)
    assert lookup.lookup(stats, 2) == [11, 2]
    assert scan(stats.history, 2) == [12, 3]  # what the latest occurrence alone guesses
    # Once the answer leaves the copied place, the latest occurrence decides again.
    for token in (12, 3, 7, 8, 9, 10):
        stats.append(token)
    assert lookup.lookup(stats, 1) == [12]


def scan(history: list[int], n: int, sizes=(4, 3, 2)) -> list[int]:
    """The lookup by brute force: the latest earlier occurrence of the longest tail n-gram."""
    for size in sizes:
        if len(history) <= size:
            continue
        tail = history[-size:]
        for start in range(len(history) - size - 1, -1, -1):
            if history[start : start + size] == tail:
                return history[start + size : start + size + n]
    return []


def test_prompt_lookup_index_kept_as_tokens_come_equals_a_full_scan():
    # The index is brought up to date at each lookup, by one token or by many at once
    # (guesses accepted, or steps without a lookup); small alphabets make many repeats.
    rng = np.random.default_rng(7)
    lookup = PromptLookup()
    for alphabet in (3, 6, 50):
        stats = DraftStats(history=[int(t) for t in rng.integers(0, alphabet, 40)])
        for _ in range(200):
            n = int(rng.integers(0, 9))
            stats.source = -1  # the index alone, not the place the last guess came from
            assert lookup.lookup(stats, n) == scan(stats.history, n)
            for t in rng.integers(0, alphabet, int(rng.choice([1, 1, 1, 5]))):
                stats.append(int(t))


def test_step_costs_interpolate_extrapolate_and_fall_back():
    costs = StepCosts()
    assert costs.ratio(2, 1, 5) == pytest.approx(1 + StepCosts.PRIOR_ROW_COST * 4)  # nothing measured
    costs.observe(2, 1, 1, 0.010)
    costs.observe(2, 1, 2, 0.012)
    costs.observe(2, 1, 4, 0.016)
    costs.observe(2, 1, 4, 0.030)  # a slower measurement does not replace the fastest
    assert costs.ratio(2, 1, 3) == pytest.approx(1.4)
    assert costs.ratio(2, 1, 8) == pytest.approx(2.4)  # the last two points' slope
    assert costs.ratio(1, 1, 4) == pytest.approx(1.6)  # another thread count's measurements
    assert costs.ratio(2, 1, 1) == 1.0


def test_rows_are_priced_against_one_row_steps_of_their_own_context():
    costs = StepCosts()
    costs.observe(2, 1, 1, 0.010, context=100)  # short answers: cheap one-row steps
    costs.observe(2, 1, 1, 0.020, context=1000)  # an answer copying a long prompt
    costs.observe(2, 1, 4, 0.040, context=1000)
    assert costs.ratio(2, 1, 4, context=1000) == pytest.approx(2.0)  # not 0.040 / 0.010
    assert costs.ratio(2, 1, 4, context=1100) == pytest.approx(2.0)  # the same class (1024-2047)
    # A class without a row curve of its own borrows the nearest one's ratio.
    assert costs.ratio(2, 1, 4, context=100) == pytest.approx(2.0)
    assert costs.seconds(2, 1, 1, context=100) == pytest.approx(0.010)
    assert costs.seconds(2, 1, 1, context=1500) == pytest.approx(0.020)


def test_a_length_shorter_than_the_guesses_is_tried_longer_now_and_then():
    spec = speculator()
    # Two rows measured cheap; four or more once, on a bad moment: costly ever since.
    for rows, seconds in ((1, 0.010), (2, 0.011), (4, 0.040), (8, 0.080)):
        spec.costs.observe(1, 1, rows, seconds)
    seq = sequence(REPEATING)
    spec.stats(seq).hits, spec.stats(seq).misses = 99.0, 1.0
    lengths = [len(plan[0]) for plan in (spec.plan([seq]) for _ in range(EXPLORE_EVERY)) if plan]
    assert lengths[:-1] == [1] * (EXPLORE_EVERY - 1)
    assert lengths[-1] >= 3  # measured again: a quiet figure replaces the bad one
    spec.costs.observe(1, 1, 4, 0.013)
    assert len(spec.plan([seq])[0]) >= 3


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.0, 4) == 1
    assert expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_good_guesses_on_cheap_rows_draft_and_length_follows_acceptance():
    spec = speculator()
    cheap_rows(spec.costs)
    seq = sequence(REPEATING)
    stats = spec.stats(seq)
    stats.hits, stats.misses = 9.0, 1.0  # p = 0.9
    sure = spec.plan([seq])
    assert sure is not None and sure[0] == [5, 6, 7, 8, 9, 20, 21, 1, 2, 3, 4][: len(sure[0])]
    stats.hits, stats.misses = 6.0, 4.0  # p = 0.6
    unsure = spec.plan([seq])
    assert unsure is not None and 1 <= len(unsure[0]) < len(sure[0])


def test_drafting_turns_off_when_guesses_fail_and_back_on_when_they_would_have_come_true():
    spec = speculator()
    cheap_rows(spec.costs, row=0.3)  # an extra row costs 30% of a step: guesses must be good
    seq = sequence(REPEATING)
    stats = spec.stats(seq)
    for _ in range(6):
        spec.verified(seq, drafted=4, accepted=0, finished=False)
    assert stats.p < 0.3
    assert spec.plan([seq]) is None  # slower than plain decoding: off for this sequence
    assert stats.shadow == [5, 6, 7, 8, 9, 20, 21, 1, 2, 3, 4]  # still checked, for free
    p_before = stats.p
    for token in stats.shadow[:]:
        spec.emitted(seq, token)
    assert stats.p > p_before
    while spec.plan([seq]) is None:  # the sequence keeps repeating itself: p climbs back
        guess = stats.shadow[:]
        assert guess, "a repeating sequence always has a guess"
        for token in guess:
            spec.emitted(seq, token)
    assert stats.p > 0.5


def test_a_slow_extra_row_means_no_drafting_even_for_good_guesses():
    spec = speculator()
    for rows in (1, 2, 4, 8):
        spec.costs.observe(1, 1, rows, 0.010 * rows)  # rows cost as much as steps: nothing to gain
    seq = sequence(REPEATING)
    spec.stats(seq).hits, spec.stats(seq).misses = 8.0, 2.0
    assert spec.plan([seq]) is None


def test_never_guesses_past_max_tokens():
    spec = speculator(fixed=16)
    seq = sequence(REPEATING, max_new=4, generated=1)  # two tokens left after the one fed now
    plan = spec.plan([seq])
    assert plan == [[5, 6]]
    assert spec.plan([sequence(REPEATING, max_new=2, generated=1)]) is None


def test_batched_sequences_guess_the_same_length():
    spec = speculator(fixed=8)
    short = sequence([7, 1, 2, 3, 4, 5, 1, 2, 3, 4])  # two tokens to guess, then the end of history
    long = sequence(REPEATING)
    plan = spec.plan([short, long])
    assert plan is not None and len(plan[0]) == len(plan[1]) == 5 and plan[0] == [5, 1, 2, 3, 4]


class CostlyDrafter:
    """A drafter whose guesses take a decode each (as a draft model's do)."""

    free_to_check = False

    def __init__(self, guess_seconds: float) -> None:
        self.guess_seconds = guess_seconds
        self.asked: list[int] = []

    def propose(self, wanted):
        self.asked += [n for _seq, _stats, n in wanted]
        return [[1] * n for _seq, _stats, n in wanted]

    def moved(self, src, dst):
        pass

    def close(self):
        pass


def test_a_costly_drafter_is_skipped_when_it_would_not_pay_and_tried_again_later():
    slow = CostlyDrafter(guess_seconds=0.010)  # a guess costs as much as a step
    spec = speculator(slow)
    cheap_rows(spec.costs)
    seq = sequence(REPEATING, generated=5)
    assert spec.plan([seq]) is None and slow.asked == []  # decided before any guess was made
    assert spec.stats(seq).trial_after > 5
    seq.n_generated = spec.stats(seq).trial_after - 1
    assert spec.plan([seq]) is None and slow.asked == []  # not even weighed before the trial point

    fast = CostlyDrafter(guess_seconds=0.0005)
    spec = speculator(fast)
    cheap_rows(spec.costs)
    good = sequence(REPEATING)
    spec.stats(good).hits, spec.stats(good).misses = 9.0, 1.0
    plan = spec.plan([good])
    assert plan is not None and len(plan[0]) >= 2 and fast.asked == [len(plan[0])]
