"""Fixtures for the core's own tests: an isolated store and the echo test double."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    # No test may touch the user's real store or see their plugins' disable list.
    monkeypatch.setenv("NEXA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NEXA_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("NEXA_API_KEY", raising=False)


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def store(home):
    """An empty model store in ``home``."""
    from nexa.store import ModelStore

    return ModelStore(home)


@pytest.fixture
def env(monkeypatch):
    """For pulls from a loopback Hub: the machine's own token, offline switch or endpoint
    must not change what the tests see, and retries wait 10 ms. Returns ``monkeypatch``."""
    from nexa import hub

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "RETRY_WAIT", 0.01)
    return monkeypatch
