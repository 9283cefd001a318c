"""How many CPU threads the engine's decodes use, chosen between decodes from their measured times.

ggml's CPU thread pool meets at a spinning barrier after every graph node. On a quiet
machine every core decoding is fastest (~1.5x one fewer on 2 cores), but when another
process takes one core, the thread that lost it stalls all the others at the barrier and
a step takes 10-50x longer (docs/benchmarks.md). ``ThreadGovernor`` has both: it decodes
with every physical core while steps take their usual time, gives one thread back as
soon as steps take several times their usual time (or longer than with one thread fewer),
and tries one more thread again at growing intervals, keeping it only when that step
beats the step just before it. Only the count changes, between two decodes
(``llama_set_n_threads``): with every core the engine's context decodes on a persistent
pool whose workers poll for the next graph, with fewer ggml makes its threads per graph
and the pool sleeps (``nexa_llama_cpp.native.ThreadPool``), so a change costs nothing.

A step's usual time is the fastest seen for its shape (``StepShape``) at that thread
count: contention only ever makes a step slower, so the minimum is the quiet figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import attrs

StepShape = Hashable
"""What a decode's time depends on besides the threads: the kind of step, its rows and
the size class of the context it attends to."""


def context_class(context: int) -> int:
    # 0: under 512 cached tokens, 1: under 1024, 2: under 2048...
    return (max(0, context) // 512).bit_length()


def generation_shape(n_sequences: int, rows_per_sequence: int, context: int) -> StepShape:
    return ("gen", n_sequences, rows_per_sequence, context_class(context))


def prompt_shape(n_tokens: int, context: int) -> StepShape:
    # Prompt chunks are compared per token within a power-of-two size class.
    return ("prompt", max(1, n_tokens).bit_length(), context_class(context))


@attrs.define(eq=False)
class ThreadGovernor:
    """The engine's decode thread count (``current``), between 1 and ``most``.

    ``apply(n)`` sets the count on the llama context(s). ``adaptive=False`` keeps ``most``
    for good (``nexa serve --threads N``, or a model wholly on a GPU). The engine calls
    ``before_decode()`` before each decode and ``observe(shape, seconds, per)`` after it.
    """

    most: int
    apply: Callable[[int], None]
    adaptive: bool = True
    clock: Callable[[], float] = time.monotonic
    slow: float = 2.5
    """A step this many times its usual time at its thread count is a sign of contention."""
    stall: float = 6.0
    """...and this many times is taken as one at once (otherwise it takes two in a row)."""
    fewer_wins: float = 1.2
    """A step slower than this many times the usual time with one thread fewer also counts."""
    first_probe: float = 0.5
    """Seconds after giving a thread back before trying it again; doubles on each failed try."""
    last_probe: float = 8.0

    current: int = attrs.field(init=False)
    stepped_down: int = attrs.field(init=False, default=0)
    """Times a thread was given back (for /metrics)."""
    stepped_up: int = attrs.field(init=False, default=0)
    _usual: dict[tuple[int, StepShape], float] = attrs.field(init=False, factory=dict)
    _last: dict[StepShape, tuple[int, float]] = attrs.field(init=False, factory=dict)
    _bad_in_a_row: int = attrs.field(init=False, default=0)
    _probing: bool = attrs.field(init=False, default=False)
    _probe_after: float = attrs.field(init=False, default=0.0)
    _probe_wait: float = attrs.field(init=False, default=0.0)
    _applied: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self.most = max(1, self.most)
        self.current = self.most
        self._applied = self.most
        self._probe_wait = self.first_probe

    # --- the engine's hooks ---------------------------------------------------------------

    def before_decode(self) -> int:
        """The thread count for the next decode (set on the context when it changes)."""
        want = self.current
        if self.adaptive and self.current < self.most and self.clock() >= self._probe_after:
            want = self.current + 1
            self._probing = True
        self.use(want)
        return want

    def use(self, threads: int) -> None:
        """Set ``threads`` on the context now (calibration; ``before_decode`` otherwise)."""
        if threads != self._applied:
            self.apply(threads)
            self._applied = threads

    def observe(self, shape: StepShape, seconds: float, per: int = 1) -> None:
        """A decode of ``shape`` took ``seconds`` (``per``: divide by this, e.g. its tokens)."""
        used = self._applied
        t = seconds / max(1, per)
        usual = self.record(used, shape, t)
        last = self._last.get(shape)
        self._last[shape] = (used, t)
        if not self.adaptive:
            return
        if self._probing:
            self._probing = False
            self._after_probe(used, t, last)
            return
        if used <= 1:
            return
        fewer = self._usual.get((used - 1, shape))
        slow = usual is not None and t > self.slow * usual
        beaten = fewer is not None and t > self.fewer_wins * fewer
        if not (slow or beaten):
            self._bad_in_a_row = 0
            return
        self._bad_in_a_row += 1
        if (usual is not None and t > self.stall * usual) or self._bad_in_a_row >= 2:
            self._step_down()

    def record(self, threads: int, shape: StepShape, t: float) -> float | None:
        """Note a time of ``shape`` at ``threads``; the usual time before it (None: first)."""
        usual = self._usual.get((threads, shape))
        if usual is None or t < usual:
            self._usual[(threads, shape)] = t
        return usual

    def usual(self, threads: int, shape: StepShape) -> float | None:
        """The fastest time seen for ``shape`` at ``threads`` (per unit), None if never run."""
        return self._usual.get((threads, shape))

    # --- decisions ------------------------------------------------------------------------

    def _step_down(self) -> None:
        self.current = max(1, self.current - 1)
        self._bad_in_a_row = 0
        self.stepped_down += 1
        self._probe_after = self.clock() + self._probe_wait

    def _after_probe(self, used: int, t: float, last: tuple[int, float] | None) -> None:
        # Kept only when it beats the step just before it, of the same shape, at the count
        # in use: with a core taken, one more thread is many times slower, not faster.
        if last is not None and last[0] == self.current and t < last[1]:
            self.current = used
            self.stepped_up += 1
            self._probe_wait = self.first_probe
        elif last is not None:
            self._probe_wait = min(self._probe_wait * 2, self.last_probe)
        self._probe_after = self.clock() + (self._probe_wait if last is not None else 0.0)


def physical_cores(sysfs: str = "/sys/devices/system/cpu") -> int:
    """Physical cores this process may run on (SMT siblings counted once).

    Read from Linux's CPU topology (``sysfs``); elsewhere (or when unreadable), the CPUs
    up to 4 and half of them above (the usual two hardware threads per core).
    """
    import os
    from pathlib import Path

    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
        return n if n <= 4 else n // 2
    cores = set()
    try:
        for cpu in cpus:
            topo = Path(sysfs) / f"cpu{cpu}" / "topology"
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
    except OSError:
        n = len(cpus)
        return n if n <= 4 else n // 2
    return max(1, len(cores))
