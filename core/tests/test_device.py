"""Device detection and the --device override."""

from __future__ import annotations

import pytest

from nexa.device import detect_device


def test_detects_a_device():
    assert detect_device().kind in {"cuda", "metal", "cpu"}


@pytest.mark.parametrize("wanted, kind", [("cpu", "cpu"), ("mps", "metal"), ("metal", "metal"), ("gpu", "cuda")])
def test_override(wanted, kind):
    assert detect_device(wanted).kind == kind


def test_env_override(monkeypatch):
    monkeypatch.setenv("NEXA_DEVICE", "cpu")
    assert detect_device().kind == "cpu"


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device"):
        detect_device("tpu")
