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
