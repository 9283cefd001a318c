"""The cross-encoder rerank backend: ``/v1/rerank`` for sentence-transformers CrossEncoders.

This module owns loading a cross-encoder folder (a sentence-transformers CrossEncoder, or
a Hugging Face sequence-classification model with one output) strictly from local
files, and scoring (query, document) pairs in batches: the logit of each pair through a
sigmoid (``nexa.rerank.sigmoid``), whatever activation the model's config names, so
every cross-encoder's scores mean the same thing. A pair longer than the model's window
is refused, not silently cut. torch and sentence_transformers are imported only in
``load`` and the methods. (Embedding models rerank without this backend: the core
ranks them by cosine through the embedding backend.)
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from nexa.backend import CancelToken
from nexa.errors import ContextLengthExceeded, ModelLoadError
from nexa.rerank import sigmoid
from nexa.types import Device, Manifest, RerankRequest, RerankResult, Task
from nexa_sentence_transformers.backend import TorchModelBackend

logger = logging.getLogger("nexa.sentence_transformers")

DEFAULT_BATCH_SIZE = 32


class CrossEncoderBackend(TorchModelBackend):
    """Relevance scores from a cross-encoder, one batch of pairs at a time."""

    tasks: ClassVar[frozenset[Task]] = frozenset({Task.RERANK})

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        from nexa.formats import is_cross_encoder

        if manifest.root is None or not is_cross_encoder(manifest.root, {f.path for f in manifest.files}):
            return "not a cross-encoder (a sequence-classification model with one output)"
        return None

    def __init__(self, manifest: Manifest, device: Device, options: Any = None):
        super().__init__(manifest, device, options)
        self.batch_size = int(self.options.extra.get("rerank_batch_size", DEFAULT_BATCH_SIZE))

    def load(self) -> None:
        model = self._load("CrossEncoder", "cross-encoder")
        if model.num_labels != 1:
            raise ModelLoadError(
                f"model {self.manifest.name!r} has {model.num_labels} outputs; a reranker has one (its relevance logit)"
            )
        self.model = model

    def rerank(self, request: RerankRequest, cancel: CancelToken) -> RerankResult:
        if self.model is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        pairs = [(request.query, document) for document in request.documents]
        prompt_tokens = self._count_tokens(pairs)
        import torch

        identity = torch.nn.Identity()
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(pairs), self.batch_size):
                cancel.raise_if_cancelled()
                logits = self.model.predict(
                    pairs[start : start + self.batch_size],
                    batch_size=self.batch_size,
                    activation_fn=identity,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                scores.extend(sigmoid(float(x)) for x in logits.reshape(-1).tolist())
        return RerankResult(scores=tuple(scores), prompt_tokens=prompt_tokens)

    def _count_tokens(self, pairs: list[tuple[str, str]]) -> int:
        """Tokens of every pair as the model reads it; refuse pairs past the window."""
        limit = self.max_tokens
        encoded = self.model.tokenizer(
            [q for q, _ in pairs], [d for _, d in pairs],
            truncation=bool(limit), max_length=limit + 1 if limit else None,
        )
        lengths = [len(ids) for ids in encoded["input_ids"]]
        if limit:
            for index, length in enumerate(lengths):
                if length > limit:
                    raise ContextLengthExceeded(
                        f"documents[{index}] with the query is longer than {limit} tokens, the most model "
                        f"{self.manifest.name!r} reads at once; split the document into smaller chunks",
                        param="documents",
                    )
        return sum(lengths)
