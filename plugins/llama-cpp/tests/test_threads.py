"""Threads: the physical cores by default, fewer while other work takes cores (the
``ThreadGovernor``, driven here by given step times and a fake clock, never by timing),
``--threads`` fixing the count, and ``nexa serve`` reporting it at start."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import httpx
import pytest
from conftest import CHAT

from nexa.backend import LoadOptions
from nexa.store import ModelStore
from nexa_llama_cpp import runtime
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.engine.threads import ThreadGovernor, generation_shape, physical_cores

GEN = generation_shape(1, 1, 100)


def fake_topology(root, cores: list[tuple[int, int]]) -> None:
    for cpu, (package, core) in enumerate(cores):
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


@pytest.mark.parametrize(
    ("cores", "want"),
    [
        ([(0, 0)], 1),
        ([(0, 0), (0, 1)], 2),  # two cores (this project's VM)
        ([(0, 0), (0, 0), (0, 1), (0, 1)], 2),  # two cores with two hardware threads each
        ([(0, c) for c in range(8)] + [(1, c) for c in range(8)], 16),  # two sockets
    ],
)
def test_the_default_is_the_physical_cores(tmp_path, monkeypatch, cores, want):
    fake_topology(tmp_path, cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(len(cores))), raising=False)
    assert physical_cores(str(tmp_path)) == want


def test_without_a_readable_topology_smt_is_assumed_above_four_cpus(tmp_path, monkeypatch):
    for cpus, want in ((2, 2), (4, 4), (16, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False)
        assert physical_cores(str(tmp_path / "missing")) == want


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def governor(most: int = 2, adaptive: bool = True) -> tuple[ThreadGovernor, list[int], Clock]:
    applied: list[int] = []
    clock = Clock()
    g = ThreadGovernor(most, applied.append, adaptive=adaptive, clock=clock)
    # What the warm-up measures: one row at each count.
    g.record(most, GEN, 0.010)
    if most > 1:
        g.record(most - 1, GEN, 0.015)
    return g, applied, clock


def step(g: ThreadGovernor, seconds_by_threads: dict[int, float], shape=GEN) -> int:
    used = g.before_decode()
    g.observe(shape, seconds_by_threads[used])
    return used


def test_quiet_steps_keep_every_core():
    g, applied, _clock = governor()
    for _ in range(50):
        assert step(g, {2: 0.011, 1: 0.015}) == 2
    assert g.current == 2 and applied == [] and g.stepped_down == 0


def test_a_stalled_step_gives_a_thread_back_and_probes_bring_it_back_when_quiet():
    g, applied, clock = governor()
    # Another process takes a core: all-core steps stall at ggml's barrier (10x).
    contended = {2: 0.100, 1: 0.016}
    assert step(g, contended) == 2
    assert g.current == 1 and g.stepped_down == 1
    for _ in range(10):  # no probe before its time
        assert step(g, contended) == 1
    clock.now += 0.6
    assert step(g, contended) == 2  # the probe...
    assert g.current == 1  # ...was slower than one thread: stay, and wait longer
    clock.now += 0.6
    assert step(g, contended) == 1  # the wait doubled
    clock.now += 0.5
    assert step(g, contended) == 2 and g.current == 1
    # The other process is gone: the next probe beats one thread, and all cores come back.
    quiet = {2: 0.010, 1: 0.015}
    step(g, quiet)
    clock.now += 5
    assert step(g, quiet) == 2
    assert g.current == 2 and g.stepped_up == 1
    assert applied == [1, 2, 1, 2, 1, 2]


def test_milder_slowdowns_need_two_steps_in_a_row():
    g, _applied, _clock = governor()
    # Slower than one thread fewer would be (x1.2), but not a stall: one such step is noise.
    assert step(g, {2: 0.019, 1: 0.015}) == 2 and g.current == 2
    assert step(g, {2: 0.011, 1: 0.015}) == 2 and g.current == 2
    step(g, {2: 0.019, 1: 0.015})
    step(g, {2: 0.019, 1: 0.015})
    assert g.current == 1


def test_steps_of_other_shapes_are_judged_against_their_own_usual_time():
    g, _applied, _clock = governor()
    eight = generation_shape(8, 1, 100)
    long_context = generation_shape(1, 1, 3000)
    for shape, seconds in ((eight, 0.040), (long_context, 0.030)):
        for _ in range(5):
            assert step(g, {2: seconds, 1: seconds * 1.5}, shape) == 2
    assert g.current == 2


def test_a_fixed_count_never_changes():
    g, applied, clock = governor(adaptive=False)
    for _ in range(5):
        assert step(g, {2: 1.0}) == 2
        clock.now += 10
    assert g.current == 2 and applied == []


def test_the_backend_adapts_unless_threads_are_given(store, device, monkeypatch):
    monkeypatch.setattr(runtime, "default_threads", lambda: 2)
    for options, most, adaptive in ((LoadOptions(parallel=1), 2, device.kind == "cpu"),
                                    (LoadOptions(parallel=1, threads=1), 1, False)):
        backend = LlamaCppBackend(store.get(CHAT), device, options)
        backend.load()
        try:
            engine = backend._engine
            assert (engine.n_threads, engine.adaptive_threads) == (most, adaptive)
            info = backend.runtime_info()
            assert (info["threads_max"], info["threads_adaptive"]) == (most, adaptive)
            assert backend.engine_stats().threads_most == most
            # The library's own context (tokenizer; image chats) takes the same count.
            assert backend._llama.context_params.n_threads == most
        finally:
            backend.close()


def test_the_cpu_device_keeps_prompt_batches_off_any_gpu(store, device):
    # A GPU build of llama.cpp offloads large prompt batches to the GPU even for layers
    # kept on the CPU ("op offload"); `--device cpu` means the CPU alone.
    for options in (LoadOptions(parallel=1), LoadOptions(parallel=2)):
        backend = LlamaCppBackend(store.get(CHAT), device, options)
        backend.load()
        try:
            assert backend._llama.context_params.op_offload is (device.kind != "cpu")
            assert backend._engine._op_offload is (device.kind != "cpu")
        finally:
            backend.close()


class Serve:
    """``nexa serve MODEL`` as a user starts it, its log read line by line."""

    def __init__(self, home, model: str, *args: str) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXA_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexa.cli", "--home", str(home), "serve", model, "--port", str(self.port), *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self.lines.append("")  # end of the log
            self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 300) -> str:
        """The first log line with ``text`` (fails at once when the model could not load)."""

        def seen() -> bool:
            return any(text in line or "could not load" in line for line in self.lines) or "" in self.lines

        with self._seen:
            ok = self._seen.wait_for(seen, timeout)
            found = [line for line in self.lines if text in line]
        assert ok and found, "".join(self.lines)
        return found[0]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("args", [(), ("--threads", "1")], ids=["default", "threads-1"])
def test_nexa_serve_reports_the_threads_at_start(tmp_path, model_sources, args):
    ModelStore(tmp_path).import_path(model_sources[CHAT], name=CHAT)
    server = Serve(tmp_path, CHAT, *args)
    try:
        line = server.wait_for(f"{CHAT}: threads")
        if args:
            assert "threads 1 (fixed)" in line
        else:
            assert f"threads {physical_cores()} (adaptive" in line
        assert "KV cache f16/f16" in line and "drafting lookup" in line
        card = httpx.get(f"http://127.0.0.1:{server.port}/v1/models/{CHAT}", timeout=30).json()
        assert card["runtime"]["threads_max"] == (1 if args else physical_cores())
        assert card["runtime"]["threads_adaptive"] is not bool(args)
    finally:
        server.close()
