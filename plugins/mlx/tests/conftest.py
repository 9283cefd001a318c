"""Fixtures: a tiny random MLX model written once per session, imported into a store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_model  # noqa: E402
from tiny_model import MODEL_NAME  # noqa: E402


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
def device():
    """Where the tests run models: Metal in the nox Metal session (NEXA_DEVICE=metal), else CPU."""
    from nexa.types import Device

    return Device("metal" if os.environ.get("NEXA_DEVICE") == "metal" else "cpu")


@pytest.fixture(scope="session")
def backend(manifest, device):
    from nexa_mlx.backend import MlxBackend

    backend = MlxBackend(manifest, device)
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vision_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tiny_vision

    return tiny_vision.write_model(tmp_path_factory.mktemp("src") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def vision_manifest(store, vision_folder):
    from tiny_vision import VISION_MODEL_NAME

    # Imported the way a user would, beside the text model.
    return store.import_path(vision_folder, name=VISION_MODEL_NAME)


@pytest.fixture(scope="session")
def vision_backend(vision_manifest, device):
    from nexa_mlx.vision import MlxVisionBackend

    backend = MlxVisionBackend(vision_manifest, device)
    backend.load()
    yield backend
    backend.close()
