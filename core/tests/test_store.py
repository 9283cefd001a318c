"""The model store: names that can't escape it, imports, listing, removal, damaged manifests."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nexa.errors import ModelNotFound, StoreError
from nexa.store import ModelStore, validate_name
from nexa.types import Manifest, Task


def write_gguf(path, *, arch="llama", template=True, pooling=None):
    """A tiny but valid GGUF header plus one tensor, enough for format detection."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(2048)
    writer.add_embedding_length(8)
    if template:
        writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling))
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/etc/passwd", "a/b/c", "", ".hidden", "a\\b", "a b", "a/.."])
def test_bad_names_rejected(name):
    with pytest.raises(StoreError):
        validate_name(name)


def test_model_dir_stays_inside(home):
    store = ModelStore(home)
    assert store.model_dir("org/name").is_relative_to(store.models_dir.resolve())
    with pytest.raises(StoreError):
        store.model_dir("org/..")


def test_import_gguf_file_builds_manifest(home, tmp_path):
    src = write_gguf(tmp_path / "Tiny-Q4_K_M.gguf")
    store = ModelStore(home)
    manifest = store.import_path(src, name="me/tiny")
    assert manifest.format == "gguf" and manifest.tasks == {Task.CHAT}
    assert manifest.quant == "Q4_K_M" and manifest.context_length == 2048
    assert manifest.files[0].sha256 and manifest.files[0].size == src.stat().st_size
    assert store.get("me/tiny").name == "me/tiny"
    assert store.get("ME/TINY").name == "me/tiny"
    assert store.get("me/tiny:q4_k_m").quant == "Q4_K_M"
    with pytest.raises(ModelNotFound):
        store.get("me/tiny:Q8_0")


def test_import_folder_with_mmproj_is_vision(home, tmp_path):
    folder = tmp_path / "vlm"
    folder.mkdir()
    write_gguf(folder / "model-Q8_0.gguf")
    write_gguf(folder / "mmproj-model-f16.gguf", arch="clip", template=False)
    manifest = ModelStore(home).import_path(folder, name="me/vlm")
    assert manifest.tasks == {Task.CHAT, Task.VLM}
    assert manifest.file_path("mmproj").name == "mmproj-model-f16.gguf"
    assert manifest.file_path("weights").name == "model-Q8_0.gguf"


def test_embedding_gguf_is_embed_only(home, tmp_path):
    src = write_gguf(tmp_path / "emb.gguf", arch="bert", template=False, pooling=1)
    manifest = ModelStore(home).import_path(src, name="me/emb")
    assert manifest.tasks == {Task.EMBED}
    assert manifest.options["pooling_type"] == 1


def test_import_of_garbage_gguf_is_a_store_error(home, tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(StoreError, match="not a readable GGUF"):
        ModelStore(home).import_path(bad, name="me/bad")
    assert ModelStore(home).list() == []
    assert not (home / "models" / "me" / "bad").exists()


def test_remove_and_list(home, tmp_path):
    store = ModelStore(home)
    store.import_path(write_gguf(tmp_path / "a.gguf"), name="me/a")
    store.import_path(write_gguf(tmp_path / "b.gguf"), name="me/b")
    assert [m.name for m in store.list()] == ["me/a", "me/b"]
    store.remove("me/a")
    assert [m.name for m in store.list()] == ["me/b"]
    assert not (home / "models" / "me" / "a").exists()


def test_damaged_manifest_hides_only_that_model(home, tmp_path):
    store = ModelStore(home)
    store.import_path(write_gguf(tmp_path / "a.gguf"), name="me/a")
    store.import_path(write_gguf(tmp_path / "b.gguf"), name="me/b")
    (home / "models" / "me" / "a" / "manifest.json").write_text("{ not json")
    assert [m.name for m in store.list()] == ["me/b"]
    assert store.broken()[0][0] == "me/a"
    with pytest.raises(StoreError, match="damaged"):
        store.get("me/a")


def test_manifests_are_read_again_only_when_their_file_changes(home, tmp_path):
    store = ModelStore(home)
    store.import_path(write_gguf(tmp_path / "a.gguf"), name="me/a")
    first = store.get("me/a")
    assert store.get("me/a") is first  # unchanged file: the manifest already read
    path = home / "models" / "me" / "a" / "manifest.json"
    data = json.loads(path.read_text())
    assert data["context_length"] == 2048
    data["context_length"] = 4096  # same length of text: only the time says it changed
    before = path.stat().st_mtime_ns
    path.write_text(json.dumps(data))
    os.utime(path, ns=(before + 10**9, before + 10**9))
    edited = store.get("me/a")
    assert edited is not first and edited.context_length == 4096
    # Pulled or imported again: a new folder and file.
    store.import_path(write_gguf(tmp_path / "b.gguf", arch="bert", template=False, pooling=1), name="me/a")
    assert store.get("me/a").tasks == frozenset({Task.EMBED})


def test_manifest_with_unknown_keys_is_rejected(home, tmp_path):
    store = ModelStore(home)
    store.import_path(write_gguf(tmp_path / "a.gguf"), name="me/a")
    path = home / "models" / "me" / "a" / "manifest.json"
    data = json.loads(path.read_text())
    data["evil"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(StoreError):
        store.get("me/a")


def test_packaged_models_are_listed_and_not_removable(home, tmp_path):
    packaged = Manifest(name="pkg/model", format="gguf", tasks={Task.CHAT}, root=tmp_path, source="package:x")
    store = ModelStore(home, packaged=[packaged])
    assert [m.name for m in store.list()] == ["pkg/model"]
    with pytest.raises(StoreError, match="uninstall"):
        store.remove("pkg/model")


def test_manifest_round_trip(tmp_path):
    m = Manifest(name="a/b", format="gguf", tasks={Task.CHAT, Task.VLM}, quant="Q4_0", options={"x": 1})
    path = tmp_path / "manifest.json"
    path.write_text(m.to_json())
    again = Manifest.from_file(path)
    assert again == m and again.root == tmp_path


def test_mlx_folder_recognised_by_safetensors_metadata(home, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    header = json.dumps({"__metadata__": {"format": "mlx"}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert ModelStore(home).import_path(folder, name="me/plain-name").format == "mlx"
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert ModelStore(home).import_path(folder, name="me/other").format == "safetensors"
