"""The engine's warm-up at load: the first request must not pay for a cold model.

As llama.cpp's own server does, a short decode runs before the engine takes requests, so
the weights are paged in and the compute buffers and graph are made at load, not inside
the first request. The same decodes time the shapes the engine's choices start from: one
row at every thread count the ``ThreadGovernor`` may use (what it compares a step
against), and a few rows at once (what a speculative step costs, ``StepCosts``), while
they fit in ``BUDGET``: on a machine whose cores are taken by other work an all-core
decode can take seconds, and the timings are only a head start (the engine measures
every step anyway). The cache is empty again afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nexa_llama_cpp.engine.threads import ThreadGovernor, generation_shape

ROUNDS = 2
"""Timed decodes per shape (the fastest counts)."""
DRAFT_ROWS = (2, 4, 8)
"""Rows of one sequence timed for the cost of a speculative step."""
BUDGET = 2.0
"""Seconds the timed decodes may take in all (each started only within it)."""


def warm_up(
    lib: Any,
    ctx: Any,
    batch: Any,
    vocab: Any,
    governor: ThreadGovernor,
    capacity: int,
    step_cost: Callable[[int, int, int, float], None] | None = None,
    budget: float | None = None,
) -> float:
    """Run the warm-up decodes on sequence 0 (at most ``capacity`` rows, the batch's size)
    and clear the cache; returns the seconds taken. ``budget``: seconds for the timed
    decodes (default ``BUDGET``)."""
    L = lib
    started = time.perf_counter()
    memory = L.llama_get_memory(ctx)
    first = [t for t in (L.llama_vocab_bos(vocab), L.llama_vocab_eos(vocab)) if t >= 0] or [0]

    def decode(tokens: list[int], pos0: int) -> float:
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = len(tokens)
        t0 = time.perf_counter()
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("the warm-up decode failed")
        return time.perf_counter() - t0

    try:
        decode(first, 0)
        timed_until = time.perf_counter() + (BUDGET if budget is None else budget)

        def in_budget() -> bool:
            return time.perf_counter() < timed_until

        pos = len(first)
        counts = [governor.most] + ([governor.most - 1] if governor.adaptive and governor.most > 1 else [])
        filler = first[-1]
        for _ in range(ROUNDS):
            for threads in counts:
                if not in_budget():
                    break
                governor.use(threads)
                seconds = decode([filler], pos)
                L.llama_memory_seq_rm(memory, 0, pos, -1)
                governor.record(threads, generation_shape(1, 1, pos), seconds)
                if step_cost is not None:
                    step_cost(threads, 1, 1, seconds)
            if step_cost is not None:
                governor.use(governor.most)
                for rows in DRAFT_ROWS:
                    if rows > capacity or not in_budget():
                        break
                    seconds = decode([filler] * rows, pos)
                    L.llama_memory_seq_rm(memory, 0, pos, -1)
                    step_cost(governor.most, 1, rows, seconds)
        governor.use(governor.current)
    finally:
        L.llama_memory_clear(memory, True)
    return time.perf_counter() - started

