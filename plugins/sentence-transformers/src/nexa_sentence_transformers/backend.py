"""The sentence-transformers embedding backend: ``/v1/embeddings`` for HF-format encoders.

This module owns loading a sentence-transformers folder (or a plain Hugging Face encoder
folder, mean-pooled) strictly from local files, embedding batches of texts or token ids
into L2-normalised vectors, counting the tokens the model really saw, and refusing
inputs longer than the model's window instead of silently truncating them. torch and
sentence_transformers are imported only inside ``load`` and the methods.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

from nexa.backend import Backend, CancelToken
from nexa.errors import BadRequest, ContextLengthExceeded, ModelLoadError
from nexa.text import head_tokens
from nexa.types import Device, EmbedRequest, EmbedResult, Manifest, Task

logger = logging.getLogger("nexa.sentence_transformers")

# Architectures of HF encoder folders worth mean-pooling when a folder has no
# sentence-transformers config (modules.json) of its own.
ENCODER_ARCHITECTURES = (
    "BertModel", "RobertaModel", "XLMRobertaModel", "MPNetModel", "DistilBertModel",
    "NomicBertModel", "ModernBertModel", "DebertaV2Model", "ElectraModel", "T5EncoderModel",
)

DEFAULT_BATCH_SIZE = 32


def torch_device(device: Device) -> str:
    return {"cuda": "cuda", "metal": "mps"}.get(device.kind, "cpu")


class TorchModelBackend(Backend):
    """What the plugin's backends share: a sentence-transformers model (an embedding model
    or a cross-encoder) loaded from its local folder onto the device, freed on close."""

    name: ClassVar[str] = "sentence-transformers"
    formats: ClassVar[frozenset[str]] = frozenset({"sentence-transformers", "safetensors"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda", "metal"})
    # torch already spreads one batch over every core; a second worker would only
    # compete for them. Requests queue and each runs as one batch.
    parallel = 1
    priority: ClassVar[int] = 0

    def __init__(self, manifest: Manifest, device: Device, options: Any = None):
        super().__init__(manifest, device, options)
        self.model: Any = None
        self.max_tokens: int | None = None

    def _load(self, model_class: str, kind: str) -> Any:
        """``sentence_transformers.<model_class>`` from the manifest's folder, local files only."""
        if self.manifest.root is None:
            raise ModelLoadError(f"model {self.manifest.name!r} has no folder on disk")
        import sentence_transformers
        import torch
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        started = time.monotonic()
        try:
            # local_files_only: a model in the store is complete; never ask a hub.
            # trust_remote_code stays off: a model folder must not run code it carries.
            model = getattr(sentence_transformers, model_class)(
                str(self.manifest.root),
                device=torch_device(self.device),
                local_files_only=True,
                trust_remote_code=False,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"could not load {kind} {self.manifest.name!r}: {type(exc).__name__}: {str(exc)[:500]}"
            ) from exc
        model.eval()
        self.max_tokens = model.max_seq_length
        logger.info("loaded %s %s on %s in %.1fs (window %s tokens)", kind, self.manifest.name,
                    torch_device(self.device), time.monotonic() - started, self.max_tokens)
        return model

    def close(self) -> None:
        model, self.model = self.model, None
        del model
        if self.device.kind == "cuda":
            import torch

            torch.cuda.empty_cache()


class SentenceTransformersBackend(TorchModelBackend):
    """Embeddings with sentence-transformers, one batch at a time per loaded model."""

    tasks: ClassVar[frozenset[Task]] = frozenset({Task.EMBED})

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        if manifest.format == "safetensors":
            # A plain HF folder: only encoders make sense; a causal LM would "embed" garbage.
            architectures = _architectures(manifest)
            if not any(a in ENCODER_ARCHITECTURES for a in architectures):
                return (
                    f"config.json architectures {architectures or '(none)'} are not an encoder "
                    "this backend can mean-pool"
                )
        return None

    def __init__(self, manifest: Manifest, device: Device, options: Any = None):
        super().__init__(manifest, device, options)
        self.batch_size = int(self.options.extra.get("embed_batch_size", DEFAULT_BATCH_SIZE))
        # Opt-in only: silently embedding the first N tokens of a long document gives a
        # vector for text the client never meant; OpenAI and TEI refuse instead.
        self.truncate = bool(
            self.options.extra.get("truncate", manifest.options.get("truncate", False))
        )

    def load(self) -> None:
        self.model = self._load("SentenceTransformer", "embedding model")
        logger.info("%s embeds %s dimensions", self.manifest.name, self.model.get_embedding_dimension())

    def embed(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        if self.model is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        if not request.inputs:
            raise BadRequest("input must not be empty", param="input")
        texts = [self._as_text(i, item) for i, item in enumerate(request.inputs)]
        texts, prompt_tokens = self._fit_window(texts, cancel)
        import torch

        vectors: list[tuple[float, ...]] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                cancel.raise_if_cancelled()
                batch = texts[start : start + self.batch_size]
                array = self.model.encode(
                    batch,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                vectors.extend(tuple(float(x) for x in row) for row in array.tolist())
        return EmbedResult(vectors=tuple(vectors), prompt_tokens=prompt_tokens)

    def _as_text(self, index: int, item: str | tuple[int, ...]) -> str:
        if isinstance(item, str):
            if not item:
                raise BadRequest(f"input[{index}] is an empty string", param="input")
            return item
        # Token ids are this model's own vocabulary (as with llama.cpp): decoded here and
        # embedded like text, so special tokens and the window are handled one way.
        tokenizer = self.model.tokenizer
        vocab = len(tokenizer)
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
            raise BadRequest(
                f"input[{index}] has token id {bad[0]}, outside this model's vocabulary "
                f"(0..{vocab - 1})",
                param="input",
            )
        if not item:
            raise BadRequest(f"input[{index}] is an empty token list", param="input")
        return tokenizer.decode(list(item), skip_special_tokens=True)

    def _fit_window(self, texts: list[str], cancel: CancelToken) -> tuple[list[str], int]:
        """The texts to encode and the tokens the model sees (special tokens included).

        One text at a time, stopping at the first one past the window (refused unless
        ``truncate``): a batch of long texts is not tokenized in full just to be refused,
        and a long text is only tokenized as far as it takes to know (``head_tokens``).
        """
        tokenizer = self.model.tokenizer
        limit = self.max_tokens

        def tokenize(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=True)["input_ids"]

        if limit is None:
            return texts, sum(len(tokenize(text)) for text in texts)
        fitted: list[str] = []
        total = 0
        for index, text in enumerate(texts):
            if index % 64 == 0:
                cancel.raise_if_cancelled()
            ids, end = head_tokens(tokenize, text, limit)
            if len(ids) > limit and not self.truncate:
                raise ContextLengthExceeded(
                    f"input[{index}] is longer than {limit} tokens, the most model "
                    f"{self.manifest.name!r} embeds per input; split the text into smaller chunks",
                    param="input",
                )
            # Truncating: encode only the prefix already known to hold the window.
            fitted.append(text[:end])
            total += min(len(ids), limit)
        return fitted, total


def _architectures(manifest: Manifest) -> list[str]:
    if manifest.root is None:
        return []
    try:
        config = json.loads((Path(manifest.root) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    found = config.get("architectures") if isinstance(config, dict) else None
    return [str(a) for a in found] if isinstance(found, list) else []
