"""Fixtures of the browser tests: a real `nexa serve` on loopback, a loopback Hub to pull
from, and headless Chromium (Debian's `chromium`) driven by Playwright.

The server is started as a user starts it (`python -m nexa.cli serve`, no model argument,
so the embedded SmolLM2 loads), with a store that also holds the packaged MiniLM (from
its PyPI package) and the tiny random Stable Diffusion pipeline the diffusers plugin's
tests write. Playwright's own browser download cannot work here, so the browser is the
system's Chromium (`NEXA_CHROMIUM`, else `chromium` on the PATH). Each test saves
screenshots under `test-artifacts/browser/` (or `NEXA_ARTIFACTS`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nexa.testing import wait_until
from nexa.testing.hubserver import HubServer, tiny_gguf_bytes

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


def chromium_path() -> str:
    found = os.environ.get("NEXA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no chromium found: `apt-get install chromium` (dev.sh does it as root on Debian)", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def hub() -> Iterator[HubServer]:
    data = tiny_gguf_bytes(pad_bytes=PULL_SIZE, name="tiny pull")
    with HubServer({PULL_REPO: {PULL_FILE: data}}) as server:
        yield server


def start_server(home: Path, hub: HubServer, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, NEXA_HOME=str(home), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    for var in ("NEXA_API_KEY", "NEXA_DISABLE_PLUGINS", "NEXA_HOST", "NEXA_PORT"):
        env.pop(var, None)
    args = [sys.executable, "-m", "nexa.cli", "serve", "--port", str(port)]
    if os.environ.get("NEXA_LOAD_THREADS"):
        args += ["--threads", os.environ["NEXA_LOAD_THREADS"]]
    proc = subprocess.Popen([*args, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """A store with the tiny Stable Diffusion pipeline and a tiny random vision model
(llama + mmproj) imported as a user would; ``../picture.png`` beside it to attach."""
    sys.path.insert(0, str(ROOT / "plugins" / "diffusers" / "tests"))
    try:
        from tiny_pipeline import write_tiny_sd
    finally:
        sys.path.pop(0)
    from nexa.store import ModelStore
    from nexa_llama_cpp.testing import png_bytes, write_tiny_vlm

    root = tmp_path_factory.mktemp("browser")
    store = ModelStore(root / "home")
    store.import_path(write_tiny_sd(root / "tiny-sd"), name=TINY_SD)
    store.import_path(write_tiny_vlm(root / "tiny-vlm"), name=TINY_VLM)
    (root / "picture.png").write_bytes(png_bytes(32, 32, (10, 200, 10)))
    return root / "home"


@pytest.fixture(scope="session")
def server(home, hub) -> Iterator[str]:
    proc, base = start_server(home, hub)
    yield base
    stop_server(proc)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(server + "/")
    yield page
    context.close()
    # A page that threw (or broke its own CSP) is a failure even if the test's checks passed.
    unexpected = [e for e in errors if "401" not in e and "Failed to load resource" not in e]
    assert not unexpected, unexpected


def resident(base: str, **kw) -> dict[str, dict]:
    resp = httpx.get(base + "/v1/admin/models", timeout=30, **kw)
    resp.raise_for_status()
    return {e["model"]: e for e in resp.json()["data"]}


def until(predicate, what: str, timeout: float = 120.0):
    """Poll observable state until ``predicate()`` holds (a busy machine loads slowly)."""
    return wait_until(predicate, what, timeout=timeout, interval=0.1)
