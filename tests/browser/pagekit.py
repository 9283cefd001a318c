"""What the browser tests share besides fixtures: names, Chromium's flags, starting and
stopping a real `nexa serve`, and reading the server's own HTTP API (cf. `relkit`)."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from nexa.testing import wait_until
from nexa.testing.hubserver import HubServer

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("NEXA_ARTIFACTS") or ROOT / "test-artifacts" / "browser")
SMOLLM2 = "nexa/smollm2-135m-instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_SD = "test/tiny-sd"
TINY_VLM = "test/tiny-vlm"
PULL_REPO = "test-org/tiny-pull-GGUF"
PULL_FILE = "tiny-pull-Q8_0.gguf"
PULL_SIZE = 2 * 1024 * 1024
# Chromium's own services reach for the network (updates, safe browsing, metrics):
# nothing here may leave loopback, and a sandbox needs privileges CI's root lacks.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
    "--disable-extensions", "--disable-sync", "--no-first-run", "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
]


# The whole run (9 tests, ~75 s on a busy 2-core machine) must end within a few minutes
# even if a browser or a server hangs where no Playwright timeout reaches.
RUN_LIMIT_S = float(os.environ.get("NEXA_BROWSER_LIMIT_S", "480"))
_servers: list[subprocess.Popen] = []


def start_watchdog(uncapture: Callable[[], None], limit: float = RUN_LIMIT_S) -> threading.Timer:
    """After ``limit`` seconds: print every thread's stack (``uncapture`` first gives
    pytest's captured stderr back), kill the servers this run started, and end the
    process (exit status 124, as coreutils' ``timeout``)."""

    def expire() -> None:
        with contextlib.suppress(Exception):
            uncapture()
        sys.stderr.write(f"\nbrowser tests: the run passed its {limit:.0f} s limit; stopping\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for proc in list(_servers):
            with contextlib.suppress(OSError):
                proc.kill()
        sys.stderr.flush()
        os._exit(124)

    timer = threading.Timer(limit, expire)
    timer.daemon = True
    timer.start()
    return timer


def chromium_path() -> str:
    found = os.environ.get("NEXA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no chromium found: `apt-get install chromium` (dev.sh does it as root on Debian)", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, hub: HubServer, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, NEXA_HOME=str(home), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    for var in ("NEXA_API_KEY", "NEXA_DISABLE_PLUGINS", "NEXA_HOST", "NEXA_PORT"):
        env.pop(var, None)
    args = [sys.executable, "-m", "nexa.cli", "serve", "--port", str(port)]
    if os.environ.get("NEXA_LOAD_THREADS"):
        args += ["--threads", os.environ["NEXA_LOAD_THREADS"]]
    proc = subprocess.Popen([*args, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _servers.append(proc)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if SMOLLM2 in httpx.get(base + "/health", timeout=2).json()["models_loaded"]:
                return proc, base
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"nexa serve exited: {proc.stdout.read()}")
        assert time.monotonic() < deadline, "the default model did not load"
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ValueError):
        _servers.remove(proc)
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def resident(base: str, **kw) -> dict[str, dict]:
    resp = httpx.get(base + "/v1/admin/models", timeout=30, **kw)
    resp.raise_for_status()
    return {e["model"]: e for e in resp.json()["data"]}


def until(predicate, what: str, timeout: float = 120.0) -> None:
    """Poll observable state until ``predicate()`` holds (a busy machine loads slowly)."""
    wait_until(predicate, what, timeout=timeout)
