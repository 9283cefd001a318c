"""A pull killed mid-download leaves no half model anywhere, and the next pull resumes.

``nexa pull`` runs as a real process against the loopback Hub (``nexa.testing.hubserver``,
reached through ``HF_ENDPOINT``), which stalls at a chosen byte; the process is then
killed with SIGKILL (no cleanup possible). A server running on the same store must not
list or serve the model, ``nexa list`` must not show it, and a second ``nexa pull`` must
fetch only the missing bytes and make the model appear whole.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import relkit
from nexa.store import ModelStore
from nexa.testing import EchoBackend, serve
from nexa.testing.hubserver import HubServer, tiny_gguf_bytes

REPO = "acme/Interrupted-GGUF"
WEIGHTS = "Interrupted-Q4_K_M.gguf"
PROJECTOR = "mmproj-Interrupted-F16.gguf"


@pytest.fixture
def hub_env(monkeypatch):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


def _nexa_pull(home, url):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env["HF_ENDPOINT"] = url
    return subprocess.Popen([sys.executable, "-m", "nexa.cli", "--home", str(home), "pull", REPO, "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _part_files(home):
    blobs = home / "partial" / "blobs"
    return [p for p in blobs.glob("*.part")] if blobs.is_dir() else []


def _nothing_visible(home, server):
    assert ModelStore(home).list() == []
    assert not (home / "models" / "acme").exists(), list((home / "models").rglob("*"))
    listed = subprocess.run([sys.executable, "-m", "nexa.cli", "--home", str(home), "list"],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and REPO not in listed.stdout and REPO not in listed.stderr
    models = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]
    assert models == []
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=30,
                   json={"model": REPO, "messages": [{"role": "user", "content": "hi"}]})
    relkit.assert_error(r, 404, "model_not_found", home)


@pytest.mark.parametrize("stall_in", [WEIGHTS, PROJECTOR])
def test_killed_pull_leaves_nothing_visible_and_resumes(hub_env, home, stall_in):
    files = {
        WEIGHTS: tiny_gguf_bytes(pad_bytes=2_000_000, name="interrupted"),
        PROJECTOR: tiny_gguf_bytes(architecture="clip", chat_template=None, pad_bytes=1_500_000),
        "README.md": b"# interrupted\n",
    }
    stall = len(files[stall_in]) // 2
    with HubServer({REPO: files}) as hub, serve([EchoBackend], home=home) as server:
        hub.stall_at[(REPO, stall_in)] = stall
        first = _nexa_pull(home, hub.url)
        try:
            assert hub.stalled.wait(120), "the pull never reached the stall point"
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size == stall for p in _part_files(home)):
                assert time.monotonic() < deadline, "the pull wrote no partial file"
                time.sleep(0.05)
            _nothing_visible(home, server)  # while it is still running
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
            hub.stall_at.clear()
            hub.release()
        assert first.returncode == -signal.SIGKILL
        _nothing_visible(home, server)  # after the kill

        hub.reset_counters()
        second = _nexa_pull(home, hub.url)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err
        assert f"pulled {REPO}" in out
        # Resumed: the interrupted file continued from the byte on disk.
        assert hub.range_starts[(REPO, stall_in)] == [stall]
        assert hub.bytes_served[(REPO, stall_in)] == len(files[stall_in]) - stall

        manifest = ModelStore(home).get(REPO)
        for name in (WEIGHTS, PROJECTOR):
            data = (manifest.root / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == hashlib.sha256(files[name]).hexdigest()
        assert [m["id"] for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]] == [REPO]
        assert _part_files(home) == []
