"""Fixtures: a tiny random MLX model written once per session, imported into a store."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_model  # noqa: E402

MODEL_NAME = "mlx-community/tiny-test"


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Untied output weights: greedy decoding then wanders through varied tokens instead
    # of repeating one, which the stop-string tests need.
    return tiny_model.write_model(
        tmp_path_factory.mktemp("src") / "tiny-test", tie_word_embeddings=False
    )


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path):
    from nexa.store import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("home"))
    store.import_path(tiny_folder, name=MODEL_NAME)
    return store


@pytest.fixture(scope="session")
def manifest(store):
    return store.get(MODEL_NAME)


@pytest.fixture(scope="session")
def backend(manifest):
    from nexa.types import Device
    from nexa_mlx.backend import MlxBackend

    backend = MlxBackend(manifest, Device("cpu"))
    backend.load()
    yield backend
    backend.close()


def variant(folder: Path, dest: Path, **config_changes) -> Path:
    """A copy of the model folder with config.json changed."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(config_changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest
