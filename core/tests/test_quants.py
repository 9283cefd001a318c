"""Several quants of one repo side by side: names, the bare name, shared files, removal,
and stores written before tags existed. Pulls are real (huggingface_hub against the
loopback Hub); the served-over-HTTP check with llama.cpp is in the llama-cpp plugin."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from nexa.errors import ModelNotFound, StoreError
from nexa.hub import pull
from nexa.store import AMBIGUOUS, ModelStore
from nexa.testing import EchoBackend, echo_manifest, serve
from nexa.testing.hubserver import HubServer, tiny_gguf_bytes
from nexa.types import Task

REPO = "acme/Vision-GGUF"
MMPROJ = "mmproj-Vision-F16.gguf"


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {
        "Vision-Q4_K_M.gguf": tiny_gguf_bytes(pad_bytes=30_000, name="vision"),
        "Vision-Q8_0.gguf": tiny_gguf_bytes(pad_bytes=50_000, name="vision", context_length=4096),
        "Vision-F16.gguf": tiny_gguf_bytes(pad_bytes=90_000, name="vision"),
        MMPROJ: tiny_gguf_bytes(architecture="clip", chat_template=None, pad_bytes=20_000),
        "README.md": b"# Vision GGUF\n",
    }


@pytest.fixture
def hub(files, env):
    with HubServer({REPO: files}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        yield server


def fetched(server: HubServer) -> set[str]:
    """Files whose bytes were sent (LFS files go through the "CDN")."""
    return {what.removeprefix("cdn:") for (_, _, what), n in server.requests.items()
            if n and what.startswith("cdn:")}


def test_two_quants_side_by_side_share_one_projector(hub, store, files):
    plain = pull(store, REPO)
    hub.reset_counters()
    q8 = pull(store, f"{REPO}:q8_0")

    assert (plain.name, plain.quant) == (REPO, "Q4_K_M")
    assert (q8.name, q8.quant, q8.context_length) == (f"{REPO}:Q8_0", "Q8_0", 4096)
    assert [m.name for m in store.list()] == [REPO, f"{REPO}:Q8_0"]
    # The projector both quants use crossed the wire once and is one file on disk.
    assert fetched(hub) == {"Vision-Q8_0.gguf"}
    a, b = (plain.root / MMPROJ).stat(), (q8.root / MMPROJ).stat()
    assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and a.st_nlink == 2
    # Each is addressable by its own name; the untagged one also by its quant.
    assert store.get(f"{REPO}:Q8_0").file_path("weights").read_bytes() == files["Vision-Q8_0.gguf"]
    assert store.get(REPO).file_path("weights").read_bytes() == files["Vision-Q4_K_M.gguf"]
    assert store.get(f"{REPO}:q4_k_m").name == REPO
    assert store.get(f"{REPO.lower()}:Q8_0").name == f"{REPO}:Q8_0"

    # Removing one quant leaves the other whole, shared file included.
    assert store.remove(f"{REPO}:Q8_0").name == f"{REPO}:Q8_0"
    assert [m.name for m in store.list()] == [REPO]
    assert (plain.root / MMPROJ).read_bytes() == files[MMPROJ]
    assert (plain.root / MMPROJ).stat().st_nlink == 1
    with pytest.raises(ModelNotFound, match=rf"in the store: {REPO} \(Q4_K_M\)"):
        store.get(f"{REPO}:Q8_0")

    # And the other way round: the untagged model goes, the tagged one stays.
    q8 = pull(store, f"{REPO}:Q8_0")
    store.remove(REPO)
    assert [m.name for m in store.list()] == [f"{REPO}:Q8_0"]
    assert (q8.root / MMPROJ).read_bytes() == files[MMPROJ]
    assert store.get(REPO).name == f"{REPO}:Q8_0"  # now the only one


def test_a_shared_file_removed_during_a_pull_is_downloaded_instead(hub, store, files, monkeypatch):
    pull(store, REPO)
    index = ModelStore.file_index
    calls = []

    def index_then_removed(self):
        found = index(self)
        if not calls:  # another process removes the model the pull meant to share with
            self.remove(REPO)
        calls.append(found)
        return found

    monkeypatch.setattr(ModelStore, "file_index", index_then_removed)
    hub.reset_counters()
    q8 = pull(store, f"{REPO}:Q8_0")
    assert MMPROJ in {Path(p).name for p in calls[0].values()}
    assert fetched(hub) == {"Vision-Q8_0.gguf", MMPROJ}
    assert (q8.root / MMPROJ).read_bytes() == files[MMPROJ]
    assert [m.name for m in store.list()] == [f"{REPO}:Q8_0"]


def test_bare_name_is_the_untagged_pull_else_the_only_quant_else_a_400(hub, store):
    pull(store, f"{REPO}:Q8_0")
    assert store.get(REPO).name == f"{REPO}:Q8_0"
    pull(store, f"{REPO}:fp16")
    with pytest.raises(StoreError) as err:
        store.get(REPO)
    assert err.value.status == 400 and err.value.code == AMBIGUOUS and err.value.param == "model"
    assert f"{REPO}:F16" in err.value.message and f"{REPO}:Q8_0" in err.value.message
    with pytest.raises(StoreError, match="several quants"):
        store.remove(REPO)
    assert len(store.list()) == 2
    pull(store, REPO)
    assert store.get(REPO).quant == "Q4_K_M"
    assert [m.name for m in store.family(REPO)] == [REPO, f"{REPO}:F16", f"{REPO}:Q8_0"]


def test_naming_the_quant_the_untagged_model_holds_is_up_to_date(hub, store):
    plain = pull(store, REPO)
    hub.reset_counters()
    again = pull(store, f"{REPO}:Q4_K_M")
    assert again == plain and again.name == REPO
    assert fetched(hub) == set()
    assert [m.name for m in store.list()] == [REPO]


def _write_old_model(home, files, quant: str) -> dict:
    """A model folder exactly as nexa wrote it before tags: one folder per repo."""
    folder = home / "models" / "acme" / "Vision-GGUF"
    folder.mkdir(parents=True)
    weights = f"Vision-{quant}.gguf"
    entries = []
    for path, role in ((weights, "weights"), (MMPROJ, "mmproj")):
        (folder / path).write_bytes(files[path])
        entries.append({"path": path, "size": len(files[path]),
                        "sha256": hashlib.sha256(files[path]).hexdigest(), "role": role})
    manifest = {
        "name": REPO, "format": "gguf", "tasks": ["chat", "vlm"], "files": entries,
        "quant": quant, "backend": None, "source": f"hf:{REPO}@{'0' * 40}",
        "context_length": 2048, "options": {"architecture": "llama"}, "version": 1,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def test_a_store_from_before_tags_keeps_working(hub, store, files, home):
    _write_old_model(home, files, "Q4_K_M")
    before = (home / "models" / "acme" / "Vision-GGUF" / "manifest.json").read_bytes()

    (old,) = store.list()
    assert (old.name, old.quant, old.tasks) == (REPO, "Q4_K_M", {Task.CHAT, Task.VLM})
    assert store.get(REPO) == old == store.get(f"{REPO}:Q4_K_M")

    q8 = pull(store, f"{REPO}:Q8_0")
    assert fetched(hub) == {"Vision-Q8_0.gguf"}  # the projector came from the old folder
    assert (q8.root / MMPROJ).stat().st_ino == (old.root / MMPROJ).stat().st_ino
    assert store.get(REPO) == old
    assert [m.name for m in store.list()] == [REPO, f"{REPO}:Q8_0"]
    assert (home / "models" / "acme" / "Vision-GGUF" / "manifest.json").read_bytes() == before
    store.remove(f"{REPO}:Q8_0")
    assert store.get(REPO).file_path("mmproj").read_bytes() == files[MMPROJ]


def test_pulling_untagged_over_an_old_quant_keeps_that_quant(hub, store, files, home):
    # Before tags, `nexa pull ORG/REPO:Q8_0` stored Q8_0 under the bare name.
    _write_old_model(home, files, "Q8_0")
    plain = pull(store, REPO)
    assert (plain.name, plain.quant) == (REPO, "Q4_K_M")
    kept = store.get(f"{REPO}:Q8_0")
    assert kept.name == f"{REPO}:Q8_0" and kept.source == f"hf:{REPO}@{'0' * 40}"
    assert kept.file_path("weights").read_bytes() == files["Vision-Q8_0.gguf"]
    assert (kept.root / MMPROJ).stat().st_ino == (plain.root / MMPROJ).stat().st_ino
    assert "Vision-Q8_0.gguf" not in fetched(hub)


def test_imports_take_tagged_names_and_share_identical_files(store, tmp_path, home):
    src = tmp_path / "Tiny-Q8_0.gguf"
    src.write_bytes(tiny_gguf_bytes(pad_bytes=4_000))
    first = store.import_path(src, name="me/tiny")
    second = store.import_path(src, name="me/tiny:Q8_0-copy")
    assert second.root == (home / "models" / "me" / "tiny@Q8_0-copy").resolve()
    assert first.file_path().stat().st_ino == second.file_path().stat().st_ino
    assert store.get("me/tiny:Q8_0-copy") == second
    assert store.get("me/tiny") == first


@pytest.mark.parametrize("name", ["me/x:", "me/x:a/b", "me/x:a b", "me/x@y", "me/x:y:z"])
def test_bad_tags_are_refused(store, tmp_path, name):
    src = tmp_path / "m.gguf"
    src.write_bytes(tiny_gguf_bytes())
    with pytest.raises(StoreError, match="invalid model name"):
        store.import_path(src, name=name)


def _write_echo(home, name: str, quant: str | None) -> None:
    manifest = echo_manifest(name)
    folder = home / "models" / name.replace(":", "@")
    folder.mkdir(parents=True)
    data = json.loads(manifest.to_json())
    data.update(quant=quant, source="local:test")
    (folder / "manifest.json").write_text(json.dumps(data))


def test_server_answers_each_quant_and_refuses_the_ambiguous_name(home):
    _write_echo(home, "acme/echo:Q4_0", "Q4_0")
    _write_echo(home, "acme/echo:Q8_0", "Q8_0")
    with serve([EchoBackend], home=home) as server:
        ids = [m["id"] for m in httpx.get(server.base_url + "/v1/models").json()["data"]]
        assert ids == ["acme/echo:Q4_0", "acme/echo:Q8_0"]
        for name in ids:
            answer = httpx.post(server.base_url + "/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "which one"}]})
            assert answer.status_code == 200 and answer.json()["model"] == name
        loaded = httpx.get(server.base_url + "/health").json()["models_loaded"]
        assert loaded == ["acme/echo:Q4_0", "acme/echo:Q8_0"]  # two models, not one
        bare = httpx.post(server.base_url + "/v1/chat/completions", json={
            "model": "acme/echo", "messages": [{"role": "user", "content": "which one"}]})
        assert bare.status_code == 400
        error = bare.json()["error"]
        assert error["code"] == AMBIGUOUS and error["param"] == "model"
        assert error["type"] == "invalid_request_error"
        assert "acme/echo:Q4_0" in error["message"] and "acme/echo:Q8_0" in error["message"]
        assert httpx.get(server.base_url + "/v1/models/acme/echo").status_code == 400
        assert httpx.get(server.base_url + "/v1/models/acme/echo:Q8_0").json()["quant"] == "Q8_0"


def test_the_cli_lists_shows_and_removes_each_quant(hub, home, files):
    env = {**os.environ, "NEXA_HOME": str(home)}

    def nexa(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nexa.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    for spec in (REPO, f"{REPO}:Q8_0"):
        assert nexa("pull", spec, "--quiet").returncode == 0
    # (Ready models of installed plugins are listed too; only ours matter here.)
    rows = [line.split()[:3] for line in nexa("list").stdout.splitlines()[1:] if line.startswith(REPO)]
    assert rows == [[REPO, "gguf", "Q4_K_M"], [f"{REPO}:Q8_0", "gguf", "Q8_0"]]
    shown = json.loads(nexa("show", f"{REPO}:Q8_0", "--json").stdout)
    assert (shown["name"], shown["quant"]) == (f"{REPO}:Q8_0", "Q8_0")
    assert nexa("remove", f"{REPO}:Q8_0").stdout == f"removed {REPO}:Q8_0\n"
    listed = [m["name"] for m in json.loads(nexa("list", "--json").stdout)["models"]]
    assert [name for name in listed if name.startswith(REPO)] == [REPO]
    assert json.loads(nexa("show", REPO, "--json").stdout)["quant"] == "Q4_K_M"
    # Two tagged quants and no untagged one: the bare name is refused, naming both.
    assert nexa("pull", f"{REPO}:Q8_0", "--quiet").returncode == 0
    assert nexa("remove", REPO).returncode == 0
    assert nexa("pull", f"{REPO}:F16", "--quiet").returncode == 0
    refused = nexa("show", REPO)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{REPO}:F16" in refused.stderr and f"{REPO}:Q8_0" in refused.stderr
