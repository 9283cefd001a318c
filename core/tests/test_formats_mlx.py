"""Format detection of MLX model folders: text models and vision models (mlx-vlm layout)."""

from __future__ import annotations

import json

from nexa.formats import describe_folder
from nexa.types import ModelFile, Task


def mlx_folder(tmp_path, config: dict, extra: tuple[str, ...] = ()):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    header = json.dumps({"__metadata__": {"format": "mlx"}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    names = ("config.json", "model.safetensors", "tokenizer.json", *extra)
    for name in names[2:]:
        (folder / name).write_text("{}")
    files = [ModelFile(path=name, size=(folder / name).stat().st_size) for name in names]
    return describe_folder("acme/model", folder, files, source="test")


def test_mlx_text_model_is_chat_only(tmp_path):
    manifest = mlx_folder(tmp_path, {"model_type": "qwen2", "max_position_embeddings": 1024})
    assert manifest.format == "mlx"
    assert manifest.tasks == {Task.CHAT}
    assert manifest.context_length == 1024


def test_mlx_vision_model_declares_vlm_and_reads_the_text_config(tmp_path):
    config = {
        "model_type": "llava",
        "text_config": {"model_type": "llama", "max_position_embeddings": 4096},
        "vision_config": {"model_type": "clip_vision_model"},
    }
    manifest = mlx_folder(tmp_path, config, extra=("preprocessor_config.json", "processor_config.json"))
    assert manifest.format == "mlx"
    assert manifest.tasks == {Task.CHAT, Task.VLM}
    assert manifest.context_length == 4096
    assert manifest.file_path("weights").name == "model.safetensors"
    assert {f.path for f in manifest.files if f.role == "config"} >= {
        "preprocessor_config.json", "processor_config.json"
    }
