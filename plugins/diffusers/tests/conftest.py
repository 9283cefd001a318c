"""Fixtures: a tiny random Stable Diffusion pipeline, imported into a store as a user would."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexa.store import ModelStore
from nexa.types import Device, Manifest

TINY_NAME = "test/tiny-sd"


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_pipeline import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd-src") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_sd_folder: Path) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("nexa-home"))
    store.import_path(tiny_sd_folder, name=TINY_NAME)
    return store


@pytest.fixture(scope="session")
def tiny_manifest(tiny_store: ModelStore) -> Manifest:
    return tiny_store.get(TINY_NAME)


@pytest.fixture(scope="session")
def loaded_backend(tiny_manifest: Manifest):
    from nexa_diffusers.backend import DiffusersBackend

    backend = DiffusersBackend(tiny_manifest, Device("cpu"))
    backend.load()
    yield backend
    backend.close()

