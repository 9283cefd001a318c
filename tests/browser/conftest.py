"""Fixtures of the browser tests: a real `nexa serve` on loopback, a loopback Hub to pull
from, and headless Chromium (Debian's `chromium`) driven by Playwright.

The server is started as a user starts it (`python -m nexa.cli serve`, no model argument,
so the embedded SmolLM2 loads), with a store that also holds the packaged MiniLM (from
its PyPI package) and the tiny random Stable Diffusion pipeline the diffusers plugin's
tests write. Playwright's own browser download cannot work here, so the browser is the
system's Chromium (`NEXA_CHROMIUM`, else `chromium` on the PATH). Each test saves
screenshots under `test-artifacts/browser/` (or `NEXA_ARTIFACTS`). The whole run is
bounded (`pagekit.RUN_LIMIT_S`, `NEXA_BROWSER_LIMIT_S`): past it, stacks are printed and
the run ends.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pagekit import (
    ARTIFACTS,
    CHROMIUM_ARGS,
    PULL_FILE,
    PULL_REPO,
    PULL_SIZE,
    ROOT,
    TINY_SD,
    TINY_VLM,
    chromium_path,
    start_server,
    start_watchdog,
    stop_server,
)

from nexa.testing.hubserver import HubServer, tiny_gguf_bytes


@pytest.fixture(scope="session", autouse=True)
def _run_limit(pytestconfig) -> Iterator[None]:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    timer = start_watchdog(lambda: capture.suspend_global_capture(in_=False))
    yield
    timer.cancel()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def hub() -> Iterator[HubServer]:
    data = tiny_gguf_bytes(pad_bytes=PULL_SIZE, name="tiny pull")
    with HubServer({PULL_REPO: {PULL_FILE: data}}) as server:
        yield server


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
