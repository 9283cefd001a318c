"""GGUF rerankers (pooling type rank) on llama.cpp: ``LlamaCppRerankBackend``.

A reranker reads a query and a document together, and its classification head gives one
figure per pair. llama-cpp-python's ``Llama.embed`` ignores rank pooling, so this module
drives the context itself: many pairs per ``llama_decode``, one sequence id each, bounded
by a token budget and the sequence limit (``runtime.decode_pooled``), reading each pair's
``llama_model_n_cls_out`` head outputs from ``llama_get_embeddings_seq``. The cancel token
is checked between decodes.

Pairs are built the way llama.cpp's own server builds them (``format_prompt_rerank``):

- The GGUF carries a rerank prompt (``tokenizer.chat_template.rerank``, as llama.cpp's
  converter writes for Qwen3-Reranker): its ``{query}`` and ``{document}`` are filled in
  and the result tokenized with special-token parsing, no BOS added. Unlike the server,
  the client's text never becomes control tokens: a special token's text inside the query
  or a document stays plain text (``nexa.text.SpecialTextGuard``), and a ``{document}``
  written inside the query is text, not a placeholder.
- Otherwise (bge-reranker, jina-reranker, ms-marco cross-encoders):
  ``[BOS] query [EOS] [SEP] document [EOS]``, each special token only where the
  vocabulary says to add it (EOS falls back to SEP), query and document tokenized as plain
  text.

Scores (``PairHead``): a one-output head gives a logit, reported as its sigmoid
(``nexa.rerank.sigmoid``). Qwen3's head has two outputs ("yes", "no") that llama.cpp turns
into probabilities itself; the score is the first, P(yes), as llama.cpp's server reports.
A head with any other shape is a classifier, not a reranker, and is refused at load. A
pair longer than the context is a 400 naming the document.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import attrs

from nexa.backend import CancelToken, LoadOptions
from nexa.errors import ContextLengthExceeded, ModelLoadError
from nexa.rerank import sigmoid
from nexa.text import SpecialTextGuard
from nexa.types import BackendMetric, ChatMessage, Device, Manifest, RerankRequest, RerankResult, Task
from nexa_llama_cpp.runtime import POOLING_RANK, PooledGgufBackend, decode_pooled, pooled_groups, special_texts

if TYPE_CHECKING:
    import llama_cpp

SOFTMAX_HEAD_ARCHITECTURES = frozenset({"qwen3", "qwen3vl"})
"""Architectures whose rank head llama.cpp ends with a softmax over its outputs
(Qwen3-Reranker's "yes"/"no"): the first output is already a probability."""

_PLACEHOLDER = re.compile(r"(\{query\}|\{document\})")

DEFAULT_BATCH_TOKENS = 2048
"""Tokens one decode scores at most (a longer pair still gets a decode of its own), unless
``LoadOptions.extra`` or the manifest's options set ``rerank_batch_tokens``. The pairs of
one decode share one micro-batch, whose attention work grows with the square of its
tokens even though each pair only attends to itself: with flash attention on a CPU a
pair cost the same alone or among a few thousand tokens, and half as much again among
8192. What batching saves is the calls, not the arithmetic, and a few thousand tokens
already make 64 documents a handful of decodes."""


@attrs.frozen
class PairHead:
    """How a reranker's head outputs become one relevance score."""

    outputs: int
    """``llama_model_n_cls_out``: floats per pair."""
    softmaxed: bool
    """llama.cpp has already turned the outputs into probabilities (score = the first);
    otherwise the one output is a logit (score = its sigmoid)."""

    @classmethod
    def of(cls, architecture: str, outputs: int, name: str) -> PairHead:
        """The head of a model, or ``ModelLoadError`` when it is no reranker's."""
        if architecture in SOFTMAX_HEAD_ARCHITECTURES:
            if outputs < 2:
                raise ModelLoadError(
                    f"{name!r} ({architecture}) has a rank head with {outputs} output; a {architecture} "
                    "reranker has two (yes, no), which llama.cpp's converter writes"
                )
            return cls(outputs, softmaxed=True)
        if outputs != 1:
            raise ModelLoadError(
                f"{name!r} has a classification head with {outputs} outputs; a reranker has one (its relevance logit)"
            )
        return cls(outputs, softmaxed=False)

    def score(self, output: Sequence[float]) -> float:
        return float(output[0]) if self.softmaxed else sigmoid(float(output[0]))


class PairPrompt:
    """The token ids a model reads for (query, document) pairs (see the module docstring).

    ``tokenize(text, special)`` is the model's tokenizer without BOS/EOS added;
    ``template`` the GGUF's rerank prompt or None; ``specials`` the texts the tokenizer
    parses as control tokens when asked to; ``bos``/``eos``/``sep`` the ids to put around
    a classic pair (None: not added).
    """

    def __init__(
        self,
        tokenize: Callable[[str, bool], list[int]],
        *,
        template: str | None = None,
        specials: Sequence[str] = (),
        bos: int | None = None,
        eos: int | None = None,
        sep: int | None = None,
    ) -> None:
        self._tokenize = tokenize
        self._parts = _PLACEHOLDER.split(template) if template is not None else None
        self._guard = SpecialTextGuard(specials)
        self._head = [t for t in (bos,) if t is not None]
        self._middle = [t for t in (eos, sep) if t is not None]
        self._tail = [t for t in (eos,) if t is not None]

    @classmethod
    def of(cls, llama: llama_cpp.Llama) -> PairPrompt:
        """The pair format of a loaded model, read from its GGUF as llama.cpp's server does."""
        import llama_cpp

        def tokenize(text: str, special: bool) -> list[int]:
            return llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)

        template = llama_cpp.llama_model_chat_template(llama._model.model, b"rerank")
        if template is not None:
            return cls(tokenize, template=template.decode("utf-8", "replace"), specials=special_texts(llama))
        vocab = llama._model.vocab

        def token(id_: int, add: bool) -> int | None:
            return id_ if add and id_ >= 0 else None

        eos = llama_cpp.llama_vocab_eos(vocab)
        if eos < 0:
            eos = llama_cpp.llama_vocab_sep(vocab)
        return cls(
            tokenize,
            bos=token(llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_get_add_bos(vocab)),
            eos=token(eos, llama_cpp.llama_vocab_get_add_eos(vocab)),
            sep=token(llama_cpp.llama_vocab_sep(vocab), llama_cpp.llama_vocab_get_add_sep(vocab)),
        )

    @property
    def templated(self) -> bool:
        """Pairs are the GGUF's rerank prompt filled in (else the classic token layout)."""
        return self._parts is not None

    def pairs(self, query: str, documents: Sequence[str]) -> list[list[int]]:
        """One token list per document, in order."""
        if self._parts is None:
            q = self._tokenize(query, False)
            return [self._head + q + self._middle + self._tokenize(d, False) + self._tail for d in documents]
        shielded = self._guard.shield([ChatMessage("user", text) for text in (query, *documents)])
        query_text, *texts = (str(m.content) for m in shielded.messages)

        def markup(text: str, first: bool) -> list[int]:
            return self._tokenize(text, True)

        def plain(text: str, first: bool) -> list[int]:
            return self._tokenize(text, False)

        out = []
        for text in texts:
            fill = {"{query}": query_text, "{document}": text}
            rendered = "".join(fill.get(part, part) for part in self._parts)
            out.append(shielded.tokenize(rendered, markup, plain))
        return out


class LlamaCppRerankBackend(PooledGgufBackend):
    """GGUF rerankers (pooling type rank) on llama.cpp, many pairs per decode."""

    tasks: ClassVar[frozenset[Task]] = frozenset({Task.RERANK})

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        if manifest.options.get("pooling_type") != POOLING_RANK:
            return "not a reranker (a GGUF with pooling type rank)"
        return super().supports(manifest, device)

    def __init__(self, manifest: Manifest, device: Device, options: LoadOptions | None = None):
        super().__init__(manifest, device, options)
        self._prompt: PairPrompt | None = None
        self._head: PairHead | None = None
        self._decodes = 0
        self._documents = 0
        setting = self.options.extra.get("rerank_batch_tokens") or manifest.options.get("rerank_batch_tokens")
        self.batch_tokens = int(setting or DEFAULT_BATCH_TOKENS)
        """Tokens per decode at most (``DEFAULT_BATCH_TOKENS``)."""

    def load(self) -> None:
        import llama_cpp

        # Flash attention (on unless the manifest's options.flash_attn is false) keeps a
        # micro-batch of the whole context from materialising its square of attention
        # scores per head.
        flash_attn = self.manifest.options.get("flash_attn", True) is not False
        llama = self.open_pooled(flash_attn=flash_attn)
        try:
            if llama.pooling_type() != POOLING_RANK:
                raise ModelLoadError(f"{self.manifest.name!r} does not pool by rank: it is not a reranker")
            architecture = str(llama.metadata.get("general.architecture", ""))
            outputs = int(llama_cpp.llama_model_n_cls_out(llama._model.model))
            self._head = PairHead.of(architecture, outputs, self.manifest.name)
            self._prompt = PairPrompt.of(llama)
        except BaseException:
            llama.close()
            raise
        self._llama = llama

    def rerank(self, request: RerankRequest, cancel: CancelToken) -> RerankResult:
        with self._lock:
            return self._rerank(request, cancel)

    def _rerank(self, request: RerankRequest, cancel: CancelToken) -> RerankResult:
        llama, prompt, head = self._llama, self._prompt, self._head
        if llama is None or prompt is None or head is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        # A pair must fit the context, and the trained context too: a BERT's learned
        # position table has no rows past it.
        trained = llama._model.n_ctx_train()
        limit = min(llama.n_ctx(), trained) if trained > 0 else llama.n_ctx()
        sequences = prompt.pairs(request.query, request.documents)
        for index, ids in enumerate(sequences):
            if len(ids) > limit:
                raise ContextLengthExceeded(
                    f"documents[{index}] with the query is {len(ids)} tokens; model {self.manifest.name!r} "
                    f"reads at most {limit} tokens per pair; split the document into smaller chunks",
                    param="documents",
                )
        scores = [0.0] * len(sequences)
        for group in self.groups([len(s) for s in sequences]):
            cancel.raise_if_cancelled()
            outputs = decode_pooled(llama, [sequences[i] for i in group], head.outputs)
            self._decodes += 1
            for index, output in zip(group, outputs, strict=True):
                scores[index] = head.score(output)
        llama._ctx.kv_cache_clear()
        self._documents += len(sequences)
        return RerankResult(scores=tuple(scores), prompt_tokens=sum(len(s) for s in sequences))

    def groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """The pairs of ``lengths`` tokens, grouped into decodes of at most ``batch_tokens``
        tokens (and never more than the context's batch) and llama.cpp's sequence limit."""
        llama = self._llama
        if llama is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        budget = max(1, min(llama.n_batch, self.batch_tokens))
        return list(pooled_groups(lengths, budget, max(1, int(llama.context_params.n_seq_max))))

    def runtime_metrics(self) -> list[BackendMetric]:
        """Decodes and documents scored, for ``/metrics``: their ratio is the batching."""
        return [
            BackendMetric("rerank_decodes", self._decodes, "counter", "llama_decode calls that scored rerank pairs"),
            BackendMetric("rerank_documents", self._documents, "counter", "Documents scored by the reranker"),
        ]
