"""Recognising model formats: from a list of files to a manifest (format, tasks, roles).

Shared by ``nexa pull`` (hub repos) and ``nexa pull PATH`` (local imports). A GGUF
file's header is read by hand (``read_gguf_metadata``, memory-mapped) for architecture,
context length, pooling, embedding size, attention shape and chat template: the ``gguf`` package would
add numpy to core's dependencies and decodes every array in the header (seconds for a
large vocabulary), where only a few strings and numbers are needed. The tests check this
reader against ``gguf.GGUFReader``.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from nexa.errors import StoreError
from nexa.types import Manifest, ModelFile, Task

QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])(I?Q[1-8](?:_[0-9A-Z]+)*|F16|F32|BF16|FP16|FP32)(?![A-Za-z0-9])", re.I
)

# Architectures llama.cpp runs as encoders: served for embeddings, never for chat.
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "xlm-roberta",
     "t5encoder", "modern-bert", "neo-bert", "gte"}
)


# llama.cpp's LLAMA_POOLING_TYPE_RANK: a classification head that scores (query, document)
# pairs (bge-reranker, jina-reranker, Qwen3 rerankers).
GGUF_POOLING_RANK = 4


def quant_of(filename: str) -> str | None:
    match = QUANT_RE.search(Path(filename).stem)
    return match.group(1).upper() if match else None


def is_mmproj(filename: str) -> bool:
    return "mmproj" in Path(filename).name.lower()


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_WANTED = ("general.architecture", "general.name", "tokenizer.chat_template")


_GGUF_WANTED_SUFFIXES = (
    ".context_length", ".pooling_type", ".embedding_length",
    # The attention shape, which sizes a token's KV cache (a backend's default context).
    ".block_count", ".attention.head_count", ".attention.head_count_kv",
    ".attention.key_length", ".attention.value_length",
)


def _gguf_wanted(key: str) -> bool:
    return key in _GGUF_WANTED or key.endswith(_GGUF_WANTED_SUFFIXES)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header's key/values that matter for routing and sizing (strings and
    numbers only; arrays are skipped).

    Read by hand rather than with ``gguf.GGUFReader``: the reader decodes every array in
    the header, and a 151k-token vocabulary (Qwen) makes that take ~30 s per import;
    skipping arrays undecoded takes ~0.1 s. The layout is GGUF v2/v3: magic, version,
    tensor count, key/value count, then typed key/values.
    """
    out: dict[str, Any] = {}
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4] != b"GGUF":
                raise ValueError("bad magic")
            _version, _tensors, count = struct.unpack_from("<IQQ", mm, 4)
            pos = 24

            def skip(kind: int, pos: int) -> int:
                if kind == _GGUF_STRING:
                    return pos + 8 + struct.unpack_from("<Q", mm, pos)[0]
                if kind == _GGUF_ARRAY:
                    elem, n = struct.unpack_from("<IQ", mm, pos)
                    pos += 12
                    if elem in (_GGUF_STRING, _GGUF_ARRAY):
                        for _ in range(n):
                            pos = skip(elem, pos)
                        return pos
                    return pos + n * struct.calcsize(_GGUF_SCALARS[elem])
                return pos + struct.calcsize(_GGUF_SCALARS[kind])

            for _ in range(count):
                size = struct.unpack_from("<Q", mm, pos)[0]
                key = mm[pos + 8 : pos + 8 + size].decode("utf-8", "replace")
                pos += 8 + size
                kind = struct.unpack_from("<I", mm, pos)[0]
                pos += 4
                if _gguf_wanted(key) and kind == _GGUF_STRING:
                    size = struct.unpack_from("<Q", mm, pos)[0]
                    out[key] = mm[pos + 8 : pos + 8 + size].decode("utf-8", "replace")
                elif _gguf_wanted(key) and kind in _GGUF_SCALARS:
                    out[key] = struct.unpack_from(_GGUF_SCALARS[kind], mm, pos)[0]
                pos = skip(kind, pos)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise StoreError(f"{path.name} is not a readable GGUF file ({type(exc).__name__})") from exc
    return out


def describe_gguf(weights: Path) -> dict[str, Any]:
    """Format facts for a GGUF file: tasks, context length, options."""
    meta = read_gguf_metadata(weights)
    arch = str(meta.get("general.architecture", ""))
    context = meta.get(f"{arch}.context_length")
    pooling = meta.get(f"{arch}.pooling_type")
    has_template = bool(meta.get("tokenizer.chat_template"))
    options: dict[str, Any] = {"architecture": arch}
    if pooling is not None:
        options["pooling_type"] = int(pooling)
    if pooling is not None and int(pooling) == GGUF_POOLING_RANK:
        tasks = {Task.RERANK}
    elif arch in EMBEDDING_ARCHITECTURES or (pooling is not None and not has_template):
        tasks = {Task.EMBED}
    else:
        tasks = {Task.CHAT}
    if f"{arch}.embedding_length" in meta:
        options["embedding_length"] = int(meta[f"{arch}.embedding_length"])
    return {
        "tasks": tasks,
        "context_length": int(context) if context is not None else None,
        "options": options,
    }


def _roles(files: Sequence[ModelFile]) -> list[ModelFile]:
    out = []
    for f in files:
        name = f.path.lower()
        if name.endswith(".gguf"):
            role = "mmproj" if is_mmproj(name) else "weights"
        elif name.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".npz")):
            role = "weights"
        elif "tokenizer" in name or name.endswith(("vocab.txt", "merges.txt", "vocab.json")):
            role = "tokenizer"
        elif name.endswith(".json"):
            role = "config"
        else:
            role = "other"
        out.append(attrs.evolve(f, role=role))
    # Weights first: `Manifest.file_path("weights")` takes the first.
    return sorted(out, key=lambda f: (f.role != "weights", f.path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _is_ctranslate2_whisper(config_path: Path) -> bool:
    config = _read_json(config_path)
    return "alignment_heads" in config or ("lang_ids" in config and "suppress_ids_begin" in config)


def is_cross_encoder(root: Path, paths: set[str]) -> bool:
    """A folder holding a reranker: a sentence-transformers CrossEncoder, or a Hugging Face
    sequence-classification model with one output (its relevance logit)."""
    if "config_sentence_transformers.json" in paths:
        st_config = _read_json(root / "config_sentence_transformers.json")
        if st_config.get("model_type") == "CrossEncoder":
            return True
    if "config.json" not in paths:
        return False
    config = _read_json(root / "config.json")
    architectures = config.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures):
        return False
    labels = config.get("id2label")
    count = len(labels) if isinstance(labels, dict) else config.get("num_labels")
    return count == 1


def safetensors_format(path: Path) -> str | None:
    """The ``format`` a safetensors header's metadata names (mlx_lm writes ``mlx``)."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            header = json.loads(fh.read(size))
        return (header.get("__metadata__") or {}).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def describe_folder(
    name: str,
    root: Path,
    files: Sequence[ModelFile],
    *,
    source: str,
    quant: str | None = None,
    backend: str | None = None,
) -> Manifest:
    """Build the manifest of a model whose files are complete under ``root``."""
    files = _roles(files)
    paths = {f.path for f in files}
    ggufs = [f for f in files if f.path.lower().endswith(".gguf") and f.role == "weights"]
    if ggufs:
        weights = ggufs[0]
        facts = describe_gguf(root / weights.path)
        tasks = set(facts["tasks"])
        if any(f.role == "mmproj" for f in files) and Task.CHAT in tasks:
            tasks.add(Task.VLM)
        return Manifest(
            name=name,
            format="gguf",
            tasks=tasks,
            files=files,
            root=root,
            quant=quant or quant_of(weights.path),
            backend=backend,
            source=source,
            context_length=facts["context_length"],
            options=facts["options"],
        )
    if "model_index.json" in paths:
        return Manifest(name=name, format="diffusers", tasks={Task.IMAGE}, files=files,
                        root=root, backend=backend, source=source)
    if "config.json" in paths and "model.bin" in paths and _is_ctranslate2_whisper(root / "config.json"):
        # faster-whisper's CTranslate2 conversion: model.bin, vocabulary, tokenizer.json.
        return Manifest(name=name, format="ctranslate2", tasks={Task.TRANSCRIBE}, files=files, root=root,
                        backend=backend, source=source, options={"architecture": "whisper"})
    if is_cross_encoder(root, paths):
        return Manifest(name=name, format="sentence-transformers", tasks={Task.RERANK},
                        files=files, root=root, backend=backend, source=source)
    if "modules.json" in paths or "config_sentence_transformers.json" in paths:
        return Manifest(name=name, format="sentence-transformers", tasks={Task.EMBED},
                        files=files, root=root, backend=backend, source=source)
    if "config.json" in paths:
        config = _read_json(root / "config.json")
        first_weights = next((f for f in files if f.path.endswith(".safetensors")), None)
        is_mlx = (
            "mlx" in name.lower()
            or "quantization" in config
            or any(f.path.endswith(".npz") for f in files)
            or (first_weights is not None and safetensors_format(root / first_weights.path) == "mlx")
        )
        if is_mlx:
            tasks = {Task.CHAT}
            if "vision_config" in config:
                tasks.add(Task.VLM)
            # Vision models (LLaVA, Gemma 3, ...) keep the language model's settings in
            # text_config; Qwen2-VL keeps them at the top.
            text_config = config.get("text_config")
            text_config = text_config if isinstance(text_config, dict) else {}
            context = config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
            return Manifest(name=name, format="mlx", tasks=tasks, files=files, root=root,
                            backend=backend, source=source, context_length=context)
        architectures = " ".join(config.get("architectures", []) or [])
        if "WhisperForConditionalGeneration" in architectures:
            return Manifest(name=name, format="safetensors", tasks={Task.TRANSCRIBE}, files=files,
                            root=root, backend=backend, source=source, options={"architecture": "whisper"})
        if any(k in architectures for k in ("BertModel", "XLMRoberta", "MPNet", "NomicBert")):
            return Manifest(name=name, format="sentence-transformers", tasks={Task.EMBED},
                            files=files, root=root, backend=backend, source=source)
        return Manifest(name=name, format="safetensors", tasks={Task.CHAT}, files=files,
                        root=root, backend=backend, source=source,
                        context_length=config.get("max_position_embeddings"))
    single = [f for f in files if f.path.lower().endswith((".safetensors", ".ckpt"))]
    if len(single) == 1:
        # A single-file checkpoint with no config: Stable Diffusion's usual distribution.
        return Manifest(name=name, format="diffusers-single-file", tasks={Task.IMAGE},
                        files=files, root=root, backend=backend, source=source)
    raise StoreError(
        f"cannot tell the format of {name!r}: expected a .gguf file, a diffusers folder "
        "(model_index.json), a sentence-transformers folder, or config.json with safetensors"
    )
