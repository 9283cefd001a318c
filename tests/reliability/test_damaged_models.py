"""Damaged models: a structured error for that request; the server stays up for the rest.

A GGUF cut in half, random bytes named ``.gguf``, an empty or missing weights file (the
llama.cpp plugin with real SmolLM2 bytes), and manifests edited by hand (not JSON,
unknown keys, wrong types, a name that is not its folder, files outside the model
folder). Each request for a damaged model gets an OpenAI-shaped error without server
paths; the good models keep serving; ``nexa list`` shows the others and warns;
``nexa remove`` can still delete a damaged model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

import relkit
from nexa.store import ModelStore
from nexa.testing import EchoBackend, echo_manifest, serve


def chat(server, model):
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=300, json={
        "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi there"}]})


def _write_manifest(home, name, text):
    folder = home / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(text)
    return folder


GOOD = json.loads(echo_manifest("test/good").to_json())
HAND_EDITS = {
    "test/not-json": "{this is not json",
    "test/empty": "",
    "test/a-list": "[]",
    "test/unknown-key": json.dumps({**GOOD, "name": "test/unknown-key", "evil": True}),
    "test/tasks-string": json.dumps({**GOOD, "name": "test/tasks-string", "tasks": "chat"}),
    "test/tasks-bogus": json.dumps({**GOOD, "name": "test/tasks-bogus", "tasks": ["mind-reading"]}),
    "test/files-string": json.dumps({**GOOD, "name": "test/files-string", "files": "weights.gguf"}),
    "test/context-string": json.dumps({**GOOD, "name": "test/context-string", "context_length": "huge"}),
    "test/context-negative": json.dumps({**GOOD, "name": "test/context-negative", "context_length": -5}),
    "test/wrong-name": json.dumps({**GOOD, "name": "test/good"}),
    "test/escape-name": json.dumps({**GOOD, "name": "../../victim"}),
    "test/file-dotdot": json.dumps({**GOOD, "name": "test/file-dotdot",
                                    "files": [{"path": "../../../etc/passwd", "size": 1, "sha256": "x"}]}),
    "test/file-absolute": json.dumps({**GOOD, "name": "test/file-absolute",
                                      "files": [{"path": "/etc/passwd", "size": 1, "sha256": "x"}]}),
    "test/file-backslash": json.dumps({**GOOD, "name": "test/file-backslash",
                                       "files": [{"path": "..\\..\\x", "size": 1, "sha256": "x"}]}),
}


@pytest.fixture
def edited_home(home):
    _write_manifest(home, "test/good", json.dumps(GOOD))
    for name, text in HAND_EDITS.items():
        _write_manifest(home, name, text)
    return home


@pytest.mark.parametrize("name", sorted(HAND_EDITS))
def test_hand_edited_manifest_is_a_400_and_others_keep_serving(edited_home, name, tmp_path):
    with serve([EchoBackend], home=edited_home) as server:
        err = relkit.assert_error(chat(server, name), 400, "store_error", tmp_path)
        assert "damaged" in err["message"] and "nexa remove" in err["message"]
        r = httpx.get(server.base_url + f"/v1/models/{name}", timeout=30)
        relkit.assert_error(r, 400, "store_error", tmp_path)
        assert chat(server, "test/good").status_code == 200
        listed = [m["id"] for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]]
        assert listed == ["test/good"]
        assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200


def test_cli_lists_the_good_warns_about_the_damaged_and_removes_them(edited_home, tmp_path):
    run = [sys.executable, "-m", "nexa.cli", "--home", str(edited_home)]
    listed = subprocess.run([*run, "list"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "test/good" in listed.stdout
    assert "Traceback" not in listed.stderr
    for name in HAND_EDITS:
        assert name in listed.stderr and "damaged" in listed.stderr, name
    (tmp_path / "victim").mkdir()
    for name in HAND_EDITS:
        removed = subprocess.run([*run, "remove", name], capture_output=True, text=True, timeout=120)
        assert removed.returncode == 0, (name, removed.stderr)
        assert not (edited_home / "models" / name).exists()
    assert (tmp_path / "victim").is_dir()
    assert (edited_home / "models" / "test" / "good" / "manifest.json").is_file()


def test_a_failing_load_is_an_error_for_that_model_only(home):
    models = [echo_manifest("test/fails", fail_load=True), echo_manifest("test/fine")]
    with serve([EchoBackend], home=home, models=models) as server:
        for _ in range(3):  # every attempt fails the same way; none hangs
            relkit.assert_error(chat(server, "test/fails"), 500, "model_load_failed")
        assert chat(server, "test/fine").status_code == 200


# --- damaged GGUF files (llama.cpp plugin, real SmolLM2 bytes) ------------------------


def _damage(store: ModelStore, name: str, how: str) -> None:
    weights = store.get(name).file_path()
    size = weights.stat().st_size
    if how == "cut-in-half":
        with weights.open("r+b") as fh:
            fh.truncate(size // 2)
    elif how == "random-bytes":
        weights.write_bytes(os.urandom(size))
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "missing":
        weights.unlink()
    elif how == "header-only":
        with weights.open("r+b") as fh:
            fh.truncate(4096)


DAMAGE = ["cut-in-half", "random-bytes", "empty", "missing", "header-only"]


@pytest.fixture(scope="module")
def damaged_store(tmp_path_factory):
    reason = relkit.llama_plugin_missing()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("damaged") / "home"
    store = ModelStore(home)
    source = relkit.smollm2_gguf()
    for how in DAMAGE:
        store.import_path(source, name=f"test/smollm2-{how}")
        _damage(store, f"test/smollm2-{how}", how)
    return home


@pytest.mark.smollm2
def test_damaged_gguf_files_are_structured_errors_and_the_server_stays_up(damaged_store):
    with serve(home=damaged_store, load_entry_points=True) as server:
        for how in DAMAGE:
            for _ in range(2):
                r = chat(server, f"test/smollm2-{how}")
                err = relkit.assert_error(r, r.status_code, None, damaged_store)
                assert r.status_code in (400, 500), (how, r.status_code)
                assert err["code"] in ("model_load_failed", "store_error"), (how, err)
                assert "smollm2" in err["message"], err  # it names the model that failed
            ok = chat(server, relkit.SMOLLM2)
            assert ok.status_code == 200, (how, ok.text)
        health = httpx.get(server.base_url + "/health", timeout=30).json()
        assert health["status"] == "ok" and health["models_loaded"] == [relkit.SMOLLM2]


@pytest.mark.smollm2
@pytest.mark.parametrize("how", ["cut-in-half", "random-bytes", "header-only"])
def test_importing_a_damaged_gguf_fails_cleanly(needs_smollm2, home, tmp_path, how):
    """``nexa pull ./broken.gguf``: a clear error and nothing half-made in the store."""
    broken = tmp_path / "broken.gguf"
    shutil.copyfile(relkit.smollm2_gguf(), broken)
    size = broken.stat().st_size
    if how == "cut-in-half":
        with broken.open("r+b") as fh:
            fh.truncate(size // 2)
    elif how == "header-only":
        with broken.open("r+b") as fh:
            fh.truncate(4096)
    else:
        broken.write_bytes(os.urandom(1 << 20))
    done = subprocess.run([sys.executable, "-m", "nexa.cli", "--home", str(home), "pull", str(broken)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        # Accepted at import (the header is intact): then the server must refuse it cleanly.
        with serve(home=home, load_entry_points=True) as server:
            r = chat(server, "local/broken")
            relkit.assert_error(r, r.status_code, None, tmp_path)
            assert r.status_code in (400, 500)
    else:
        assert "error:" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert ModelStore(home).list() == [] or all(m.source.startswith("package:") for m in ModelStore(home).list())
        assert not (home / "models" / "local").exists()
        staged = list((home / "partial").glob("staged-*")) if (home / "partial").is_dir() else []
        assert staged == []
