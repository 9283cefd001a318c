"""Which files of a Hub repo make the model: ``choose_files`` on the repo's listing.

A GGUF repo gives one quant (``:QUANT`` or the first of ``QUANT_PREFERENCE`` present, else
the smallest), all parts of a split GGUF (``-00001-of-0000N``), and one ``mmproj`` file
when the repo has any (vision models; ``MMPROJ_PREFERENCE``). A diffusers repo gives
``model_index.json`` and the folders of the components it names. Sentence-transformers,
MLX and transformers repos give their configs, tokenizer files and weights. Everywhere,
safetensors win over the same weights as ``.bin``/``.pt``/``.ckpt``; ONNX/TF/Flax/OpenVINO
exports, READMEs, images and remote code are left out.

File names from the Hub are untrusted: any unsafe name in a listing (``..``, absolute,
backslashes, control characters) refuses the whole pull (``check_names``). Pure
functions of the listing: no network, no disk.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

import attrs

from nexa.errors import StoreError
from nexa.formats import is_mmproj, quant_of
from nexa.store import MANIFEST_NAME

__all__ = ["MMPROJ_PREFERENCE", "QUANT_PREFERENCE", "RemoteFile", "check_names", "choose_files", "variant_label"]

log = logging.getLogger(__name__)

QUANT_PREFERENCE: tuple[str, ...] = (
    # 4-bit K-quants: the usual best size/quality trade-off on CPU and GPU alike.
    "Q4_K_M", "Q4_K_S", "Q4_K_XL", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS",
    # Bigger and better, then smaller and worse.
    "Q5_K_M", "Q5_K_S", "Q5_0", "Q6_K", "Q8_0", "Q3_K_M", "Q3_K_L",
    # Unquantised last: several times the size.
    "F16", "BF16", "F32",
)
"""Default GGUF quant, first present wins; a repo with none of these gives its smallest."""

MMPROJ_PREFERENCE: tuple[str, ...] = ("F16", "BF16", "F32", "Q8_0")
"""Vision projector precision, first present wins; then the model's own quant, then smallest.
Projectors are small, and llama.cpp's vision path is tested mostly at F16."""

_SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.I)

# Non-GGUF repos: what a model folder needs, and what to leave on the Hub.
_KEEP_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".vocab", ".spm", ".npz")
_PREFERRED_WEIGHTS = (".safetensors",)
_FALLBACK_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
_WEIGHT_SUFFIXES = _PREFERRED_WEIGHTS + _FALLBACK_WEIGHTS + (".npz",)
_SKIP_DIRS = frozenset(
    {"onnx", "openvino", "coreml", "tflite", "tensorrt", "flax", "tf", "runs", "logs",
     "checkpoints", "images", "samples", "assets", "original"}
)
# Training state that shares the weights' suffixes but is never needed for inference.
_TRAINING_FILES = re.compile(r"^(training_args|optimizer|scheduler|rng_state[^/]*)\.(bin|pt|pth)$")
_VARIANT_RE = re.compile(r"\.(fp16|bf16|fp32|fp8|non_ema|ema)(?=\.|-\d)", re.I)
_VARIANT_PREFERENCE = ("fp16", "bf16", "fp32")


@attrs.frozen
class RemoteFile:
    """One file of a Hub repo as its listing describes it."""

    path: str
    size: int | None = None
    sha256: str | None = None
    """Content sha256 of an LFS file."""
    git_sha1: str | None = None
    """Git blob id; the content hash of a non-LFS file."""


def _unsafe_reason(path: str) -> str | None:
    if not path or len(path) > 1024:
        return "empty or too long"
    if any(ord(c) < 32 or c in '\\:*?"<>|' for c in path):
        return "a control character, backslash or reserved character"
    if path.startswith("/"):
        return "an absolute path"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "an empty, '.' or '..' path segment"
    if any(len(p) > 255 for p in parts):
        return "a path segment over 255 characters"
    return None


def check_names(files: Sequence[RemoteFile], repo: str) -> None:
    for f in files:
        reason = _unsafe_reason(f.path)
        if reason:
            raise StoreError(
                f"the hub listed a file of {repo} with an unsafe name ({reason}): {f.path[:200]!r}; "
                "refusing to pull from it"
            )


# Labels nexa.formats.quant_of doesn't know: ternary and MXFP4 quants, ARM repacks.
_MORE_QUANTS = re.compile(r"(?<![A-Za-z0-9])(TQ[12]_0|MXFP4(?:_MOE)?|Q4_0_[48]_[48])(?![A-Za-z0-9])", re.I)


def _quant_label(stem: str) -> str | None:
    extra = _MORE_QUANTS.search(stem)
    label = extra.group(1).upper() if extra else quant_of(stem + ".gguf")
    return {"FP16": "F16", "FP32": "F32"}.get(label, label) if label else None


def _total_size(files: Sequence[RemoteFile]) -> float:
    if any(f.size is None for f in files):
        return float("inf")
    return float(sum(f.size or 0 for f in files))


def _gguf_variants(ggufs: Sequence[RemoteFile]) -> dict[str, list[RemoteFile]]:
    """Model GGUFs grouped into variants (one file, or all parts of a split), by quant label."""
    groups: dict[str, list[RemoteFile]] = defaultdict(list)
    for f in ggufs:
        match = _SPLIT_RE.match(f.path)
        groups[match["base"] if match else f.path[: -len(".gguf")]].append(f)
    variants: dict[str, list[RemoteFile]] = {}
    for key in sorted(groups, key=lambda k: (len(k), k)):
        members = sorted(groups[key], key=lambda f: f.path)
        splits = [_SPLIT_RE.match(f.path) for f in members]
        if all(splits):
            totals = {int(m["total"]) for m in splits if m}
            parts = sorted(int(m["part"]) for m in splits if m)
            if len(totals) != 1 or parts != list(range(1, totals.pop() + 1)):
                log.warning("skipping %s: its split parts are incomplete", key)
                continue
        elif len(members) > 1:
            continue  # a plain file and a split of the same name: ambiguous, leave it
        name = PurePosixPath(key).name
        label = _quant_label(name) or name
        # Two files with one label (e.g. an "-imat" copy): the shorter name wins.
        variants.setdefault(label.upper(), members)
    return variants


def _choose_gguf(
    files: Sequence[RemoteFile], quant: str | None, repo: str
) -> tuple[list[RemoteFile], str | None]:
    ggufs = [f for f in files if f.path.lower().endswith(".gguf")]
    models = [f for f in ggufs if not is_mmproj(f.path)]
    projectors = [f for f in ggufs if is_mmproj(f.path)]
    variants = _gguf_variants(models)
    if not variants:
        raise StoreError(
            f"{repo} has no complete model GGUF (only projector files or incomplete split parts)"
        )
    if quant:
        # Same labelling as the files get: "fp16" finds F16, "UD-Q4_K_XL" finds Q4_K_XL.
        label = variant_label(quant)
        if label not in variants:
            raise StoreError(
                f"{repo} has no {quant} GGUF; available: {', '.join(sorted(variants))}",
                param="model",
            )
    else:
        label = next((q for q in QUANT_PREFERENCE if q in variants), None) or min(
            variants, key=lambda q: (_total_size(variants[q]), q)
        )
    chosen = list(variants[label])
    if projectors:
        by_label: dict[str, RemoteFile] = {}
        for f in sorted(projectors, key=lambda f: (_total_size([f]), f.path)):
            by_label.setdefault(_quant_label(PurePosixPath(f.path).stem) or "", f)
        pick = next((by_label[q] for q in (*MMPROJ_PREFERENCE, label) if q in by_label), None)
        chosen.append(pick or min(projectors, key=lambda f: (_total_size([f]), f.path)))
    return chosen, (label if _quant_label(label) == label else None)


def _weights_in_folder(files: list[RemoteFile]) -> list[RemoteFile]:
    """Drop duplicate weights within one folder: safetensors over pickles, one variant."""
    names = [PurePosixPath(f.path).name for f in files]
    has_safetensors = any(n.endswith(_PREFERRED_WEIGHTS) for n in names)
    out = []
    for f, name in zip(files, names, strict=True):
        if has_safetensors and (
            name.endswith(_FALLBACK_WEIGHTS) or re.search(r"\.(bin|pt|pth)\.index\.json$", name)
        ):
            continue
        out.append(f)
    # diffusers-style variants (x.fp16.safetensors beside x.safetensors): keep the
    # unsuffixed weights when present (what loaders take by default), else one variant.
    variants = {f.path: m.group(1).lower() for f in out if (m := _VARIANT_RE.search(f.path))}
    if not variants:
        return out
    plain_weights = any(
        f.path not in variants and PurePosixPath(f.path).name.endswith(_WEIGHT_SUFFIXES)
        for f in out
    )
    if plain_weights:
        return [f for f in out if f.path not in variants]
    present = set(variants.values())
    keep = next((v for v in _VARIANT_PREFERENCE if v in present), min(present))
    return [f for f in out if variants.get(f.path, keep) == keep]


def _choose_folder(files: Sequence[RemoteFile], *, roots: set[str] | None = None) -> list[RemoteFile]:
    """The files a transformers / sentence-transformers / MLX / diffusers folder needs.

    ``roots``: when given (diffusers), only files inside these top-level folders are taken,
    plus ``model_index.json``.
    """
    kept: dict[str, list[RemoteFile]] = defaultdict(list)
    for f in files:
        parts = PurePosixPath(f.path).parts
        name = parts[-1]
        folder = "/".join(parts[:-1])
        if name == MANIFEST_NAME and not folder:
            continue  # would clash with the store's own manifest
        if any(p.startswith(".") or p.lower() in _SKIP_DIRS for p in parts):
            continue
        if roots is not None and not (f.path == "model_index.json" or (folder and parts[0] in roots)):
            continue
        lowered = name.lower()
        if _TRAINING_FILES.match(lowered):
            continue
        if not lowered.endswith(_KEEP_SUFFIXES + _PREFERRED_WEIGHTS + _FALLBACK_WEIGHTS):
            continue
        kept[folder].append(f)
    out: list[RemoteFile] = []
    for folder in sorted(kept):
        out.extend(_weights_in_folder(kept[folder]))
    return out


def choose_files(
    files: Sequence[RemoteFile],
    quant: str | None = None,
    *,
    repo: str = "repo",
    model_index: dict[str, Any] | None = None,
) -> tuple[list[RemoteFile], str | None]:
    """The files to download from a repo listing, and the GGUF quant label chosen.

    ``model_index``: the parsed ``model_index.json`` of a diffusers repo (its components
    decide which folders are needed).
    """
    check_names(files, repo)
    if any(f.path.lower().endswith(".gguf") for f in files):
        return _choose_gguf(files, quant, repo)
    if quant:
        raise StoreError(
            f"{repo} has no GGUF files; ':{quant}' picks a quant in GGUF repos only", param="model"
        )
    if model_index is not None:
        components = {
            key for key, value in model_index.items()
            if not key.startswith("_") and isinstance(value, list) and len(value) == 2
            and value[0] is not None
        }
        chosen = _choose_folder(files, roots=components)
    else:
        chosen = _choose_folder(files)
    if not any(PurePosixPath(f.path).name.lower().endswith(_WEIGHT_SUFFIXES) for f in chosen):
        raise StoreError(
            f"{repo} has no weights nexa can use (expected .gguf, or .safetensors/.bin beside a "
            "config.json or model_index.json)"
        )
    return chosen, None


def variant_label(quant: str) -> str:
    """The label a ``:QUANT`` names, as the files are labelled ("fp16" is F16)."""
    return _quant_label(quant) or quant.upper()
