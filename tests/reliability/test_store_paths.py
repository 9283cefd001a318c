"""Names from users and from the Hub never write, read or delete outside the store.

Model names with ``..``, absolute paths, backslashes, control or odd characters are
refused by every door: the store API, ``nexa pull/show/remove``, the HTTP API (also
URL-encoded), and file names in a Hub listing. A canary folder beside the store proves
nothing outside was touched, and no answer shows a server path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import httpx
import pytest

import relkit
from nexa.errors import NexaError, StoreError
from nexa.store import ModelStore
from nexa.testing import EchoBackend, echo_manifest, serve
from nexa.testing.hubserver import HubServer, tiny_gguf_bytes

BAD_NAMES = [
    "..", "../victim", "../../victim", "a/../../victim", "org/..", "org/../..", "/etc", "/tmp/victim", "org/name/extra",
    "org\\..\\victim", "..\\victim", "org/na\x00me", "org/na\nme", "org/ name", "org/name ", " org/name", ".hidden",
    "org/.hidden", "org/-dash", "~/victim", "org/" + "x" * 200, "ｏｒｇ/ｎａｍｅ", "org//name", "org/name/", "C:\\victim",
    "%2e%2e/victim", "",
]


def _snapshot(folder: Path) -> dict[str, int]:
    """Every file and folder under ``folder`` except the stores the tests create there."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
            if p.relative_to(folder).parts[0] not in ("home", "store")}


@pytest.fixture
def canary(tmp_path):
    """A folder beside the store that a path escape would reach first."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "manifest.json").write_text("{}")
    (victim / "precious.txt").write_text("keep me")
    return tmp_path


@pytest.mark.parametrize("name", BAD_NAMES)
def test_store_refuses_bad_names(home, canary, name):
    store = ModelStore(home / "store")
    before = _snapshot(canary)
    with pytest.raises(StoreError):
        store.model_dir(name)
    with pytest.raises(StoreError):
        store.staging_dir(name)
    with pytest.raises(NexaError):
        store.remove(name)
    with pytest.raises(NexaError):
        store.get(name)
    if name:  # an empty --name means the default local/<file name>
        source = canary / "weights.gguf"
        source.write_bytes(tiny_gguf_bytes())
        with pytest.raises(StoreError):
            store.import_path(source, name=name)
        source.unlink()
    assert _snapshot(canary) == before


def _cli(home, *argv):
    return subprocess.run([sys.executable, "-m", "nexa.cli", "--home", str(home), *argv],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["../victim", "../../victim", "/tmp/victim", "org/../../victim", "..\\victim"])
def test_cli_refuses_bad_names(canary, name):
    home = canary / "store"
    gguf = canary / "model.gguf"
    gguf.write_bytes(tiny_gguf_bytes())
    before = _snapshot(canary)
    for argv in (["remove", name], ["show", name], ["pull", str(gguf), "--name", name]):
        done = _cli(home, *argv)
        assert done.returncode != 0, argv
        assert "error:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert _snapshot(canary) == before
    assert not any("victim" in str(p) for p in home.rglob("*"))


@pytest.mark.parametrize("name", BAD_NAMES[:-1])
def test_http_refuses_bad_names_without_leaking_paths(home, canary, name):
    before = _snapshot(canary)
    with serve([EchoBackend], home=home, models=[echo_manifest("test/echo")]) as server:
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                           ("/v1/embeddings", {"input": "x"}), ("/v1/images/generations", {"prompt": "x"})]:
            r = httpx.post(server.base_url + path, json={"model": name, **body}, timeout=30)
            assert r.status_code in (400, 404), (name, path, r.text)
            relkit.check_error_body(r.json(), home, canary)
        quoted = urllib.parse.quote(name, safe="")
        urls = [f"/v1/models/{quoted}", "/v1/models/" + quoted.replace(".", "%2E")]
        if name.isprintable():
            urls.append(f"/v1/models/{name}")
        for url in urls:
            r = httpx.get(server.base_url + url, timeout=30)
            if r.status_code == 200:
                # The client itself folded a trailing "/.." into /v1/models (the list).
                assert r.json()["object"] == "list", (url, r.text)
                continue
            assert r.status_code in (400, 404), (url, r.text)
            relkit.check_error_body(r.json(), home, canary)
    assert _snapshot(canary) == before


@pytest.mark.parametrize("evil", ["../victim/evil.gguf", "../../evil.gguf", "/tmp/evil.gguf", "a/../../evil.gguf",
                                  "..\\evil.gguf", "a\x01.gguf", "a/./b.gguf", "C:evil.gguf"])
def test_hub_file_names_never_escape(home, canary, monkeypatch, evil):
    from huggingface_hub import constants

    from nexa.hub import pull

    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub read HF_HUB_OFFLINE at import; a machine that sets it must not turn
    # this loopback pull into an "offline" error.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    before = _snapshot(canary)
    store = ModelStore(home)
    with HubServer({"acme/Evil-GGUF": {"Evil-Q4_K_M.gguf": tiny_gguf_bytes(), evil: tiny_gguf_bytes()}}) as hub:
        with pytest.raises(StoreError, match="unsafe name"):
            pull(store, "acme/Evil-GGUF", endpoint=hub.url)
    assert _snapshot(canary) == before
    assert store.list() == []
    assert not any("evil" in str(p).lower() for p in home.rglob("*")), list(home.rglob("*"))


def test_generated_image_names_cannot_reach_files(home, canary):
    (home / "images").mkdir(parents=True)
    with serve([EchoBackend], home=home, models=[echo_manifest("test/echo")]) as server:
        for name in ["../../victim/precious.txt", "..%2F..%2Fvictim%2Fprecious.txt", "%2e%2e", "manifest.json",
                     "0" * 32 + ".png/../../../victim/precious.txt"]:
            r = httpx.get(server.base_url + "/v1/images/files/" + name, timeout=30)
            assert r.status_code in (400, 404), (name, r.status_code)
            assert b"keep me" not in r.content


def test_symlinked_model_folder_is_not_followed_out_of_the_store(home, canary):
    store = ModelStore(home)
    (home / "models" / "org").mkdir(parents=True)
    os.symlink(canary / "victim", home / "models" / "org" / "link")
    with pytest.raises(NexaError):
        store.remove("org/link")
    assert (canary / "victim" / "precious.txt").read_text() == "keep me"
