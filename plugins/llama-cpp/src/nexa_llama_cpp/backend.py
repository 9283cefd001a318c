"""The llama.cpp chat backend: text chat on the batching engine, image chat on MTMD.

One ``LlamaCppBackend`` is one loaded GGUF chat model (plus its ``mmproj`` for vision).
Its context per request and the KV cache's layout are chosen at load from the model's
trained length and the memory its KV cache takes (``context_size``). A chat goes through
these steps, each in its own module:

1. ``prompt``: the chat template rendered with the request's tools and reasoning
   switches, the grammar that constrains the answer (forced tool call,
   ``response_format``), the prompt's tokens (client text never parsed as control tokens)
   and the one context check.
2. Generation. Text: the batching engine (``engine``), ``parallel`` sequences at once
   (``--parallel 1`` is the engine with one sequence); the model's ``Llama`` is only its
   tokenizer then. Images: ``vision.ImageChat`` on the ``Llama``, one at a time.
3. ``chunker``: the thought split off (``thinking``: the model's format, its budget
   enforced in the engine), stop strings, tool-call parsing, finish reason and usage, the
   same for both.

It declares the ``reasoning``, ``logprobs`` and ``logit_bias`` capabilities on both paths
(the engine's ``Sampler`` applies the bias and reports logprobs for text and images).
``complete`` serves ``/v1/completions`` on the engine (raw text or token ids, and
fill-in-the-middle with the model's FIM tokens).

``count_prompt_tokens`` builds the same prompt without generating. Text chats stream from
the engine's thread straight to the event loop (``stream_chat``);
the synchronous ``chat`` (the ``Backend`` contract) reads the same engine events on the
caller's thread. Embedding models are ``embeddings.LlamaCppEmbedBackend``.

Heavy imports (llama_cpp, numpy) happen only inside methods.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from nexa.backend import CancelToken, LoadOptions
from nexa.errors import ContextLengthExceeded, ModelLoadError, StoreError, UnsupportedTask
from nexa.fim import FIM_TRIPLETS, FimTokens, fim_tokens
from nexa.formats import read_gguf_metadata
from nexa.reasoning import ThinkFormat, reasoning_for
from nexa.types import (
    BackendMetric,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    ContextPlan,
    Device,
    Manifest,
    Task,
)
from nexa_llama_cpp.chat_template import ChatTemplate
from nexa_llama_cpp.chunker import AnswerChunker
from nexa_llama_cpp.context_size import ContextLayout, KvBudget, KvShape, choose_context
from nexa_llama_cpp.engine import kv_types
from nexa_llama_cpp.prompt import ChatPlan, PromptBuilder, fit_context
from nexa_llama_cpp.runtime import GgufBackend, special_texts
from nexa_llama_cpp.thinking import budget_closer, find_format

if TYPE_CHECKING:
    import llama_cpp

    from nexa_llama_cpp.engine import BatchEngine, EngineStats, GenerationRequest
    from nexa_llama_cpp.vision import ImageChat

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4
"""Text chats one model runs at once by continuous batching (``nexa_llama_cpp.engine``)
when neither ``nexa serve --parallel`` nor the manifest's ``options.parallel`` says."""

TOKENIZER_CONTEXT = 256
"""The library ``Llama``'s own context when it only tokenizes (no mmproj): its KV cache
at full size would be memory never touched (on a GPU, ~600 MB for an 8B model at 4096
tokens). 256 is the least llama.cpp allocates."""


class LlamaCppBackend(GgufBackend):
    """GGUF chat models on llama.cpp: text chat (with tools and JSON grammars) and vision."""

    tasks: ClassVar[frozenset[Task]] = frozenset({Task.CHAT, Task.VLM})
    parallel = DEFAULT_PARALLEL
    stops_natively = True
    capabilities: ClassVar[frozenset[str]] = frozenset({"reasoning", "logprobs", "logit_bias"})
    load_settings: ClassVar[frozenset[str]] = frozenset({"draft", "cache_type_k", "cache_type_v"})

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        if Task.VLM in manifest.tasks and not manifest.has_role("mmproj"):
            return "vision needs an mmproj GGUF beside the model, and this model has none"
        return super().supports(manifest, device)

    def __init__(self, manifest: Manifest, device: Device, options: LoadOptions | None = None):
        options = options or LoadOptions()
        parallel = options.parallel or int(manifest.options.get("parallel") or type(self).parallel)
        super().__init__(manifest, device, attrs.evolve(options, parallel=parallel))
        self._llama: llama_cpp.Llama | None = None
        self._engine: BatchEngine | None = None
        self._vision: ImageChat | None = None
        self._prompts: PromptBuilder | None = None
        self._lock = threading.Lock()
        """Held by image chats: the ``Llama``'s one context serves one at a time."""
        self.think_format: ThinkFormat | None = None
        """The model's thought markers (``thinking.find_format``); None: it does not think."""
        self._render_special = False
        self._fim: FimTokens | None | bool = False  # False: not looked up yet
        self._layout: ContextLayout | None = None

    # --- the context -------------------------------------------------------------------

    def layout(self) -> ContextLayout:
        """The context per request and the KV cache's layout (``context_size``), worked
        out once from the GGUF header, the device's memory and ``parallel``."""
        if self._layout is None:
            try:
                shape = KvShape.from_gguf(read_gguf_metadata(self.manifest.file_path("weights")))
            except (StoreError, KeyError):
                shape = None  # the load reports an unreadable file
            self._layout = choose_context(
                trained=self.manifest.context_length,
                override=self.options.context_length,
                parallel=self.parallel,
                bytes_per_token=shape.bytes_per_token(*self._kv_types()) if shape is not None else None,
                budget=KvBudget.of(self.device, self.manifest.size),
                extra_contexts=1 if self.manifest.has_role("mmproj") else 0,
            )
        return self._layout

    def context_length(self) -> int:
        """Tokens a chat's prompt and answer share (``layout``)."""
        return self.layout().n_ctx

    def context_plan(self) -> ContextPlan:
        return self.layout().plan()
        self._flash_attn = True

    # --- loading ---------------------------------------------------------------------

    def load(self) -> None:
        from nexa_llama_cpp.engine import BatchEngine

        layout = self.layout()
        n_ctx = layout.n_ctx
        # Flash attention, as llama.cpp's server does by default ("auto"); the manifest's
        # options.flash_attn = false turns it off.
        flash_attn = self.manifest.options.get("flash_attn", True) is not False
        kv_types.check(
            kv_types.kv_type(self.options.cache_type_k, flag="--cache-type-k"),
            kv_types.kv_type(self.options.cache_type_v, flag="--cache-type-v"),
            flash_attn=flash_attn, model=self.manifest.name,
        )
        if self.manifest.has_role("mmproj"):
            # Image chats use this context. Some projectors (Gemma 3) attend bidirectionally
            # over an image's tokens, which must then fit one micro-batch; 2048 is
            # llama-server's default.
            sizes = {"n_ctx": n_ctx, "n_batch": min(2048, n_ctx), "n_ubatch": min(2048, n_ctx), **self.cache_types()}
        else:
            sizes = {"n_ctx": min(n_ctx, TOKENIZER_CONTEXT), "n_batch": min(TOKENIZER_CONTEXT, n_ctx)}
        llama = self._llama = self.open_llama(flash_attn=flash_attn, **sizes)
        bos_text = self._special_text(llama.token_bos())
        source = self.manifest.options.get("chat_template") or llama.metadata.get("tokenizer.chat_template")
        template = ChatTemplate(source, bos_token=bos_text, eos_token=self._special_text(llama.token_eos()))
        if template.is_fallback:
            log.warning("%s has no chat template; using ChatML", self.manifest.name)
        specials = special_texts(llama)
        self.think_format = find_format(self.manifest.options, None if template.is_fallback else template.source)
        # A model whose thought markers are control tokens: their text must show for the
        # thought to be found (other control tokens end the turn, or rarely come).
        fmt = self.think_format
        self._render_special = fmt is not None and (fmt.open in specials or fmt.close in specials)
        self._prompts = PromptBuilder(
            template,
            specials,
            lambda text, add_bos, special: llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special),
            bos_text,
            think=self.think_format,
        )
        if self.manifest.has_role("mmproj"):
            from nexa_llama_cpp.vision import ImageChat

            self._vision = ImageChat(llama, self.manifest.file_path("mmproj"), layout,
                                     use_gpu=self.device.kind != "cpu")
        # Same weights (no second load), its own context with one KV sequence per slot.
        settings = self.llama_settings()
        self._engine = BatchEngine(
            model=llama._model.model,
            n_seq=self.parallel,
            n_ctx=n_ctx,
            kv_size=layout.kv_cells,
            kv_unified=layout.unified,
            n_threads=settings["n_threads"],
            n_threads_batch=settings["n_threads_batch"],
            adaptive_threads=self.adaptive_threads,
            n_batch=min(512, n_ctx),
            flash_attn=flash_attn,
            op_offload=settings["op_offload"],
            n_gpu_layers=settings["n_gpu_layers"],
            draft=self._draft_setting(),
            type_k=self.options.cache_type_k,
            type_v=self.options.cache_type_v,
        )
        self._engine.start()
        self._flash_attn = flash_attn
        # The first chat's one-time Python costs (template and tokenizer paths, imports)
        # here rather than in it; the engine warmed the model itself.
        self.prepare_text(ChatRequest.create([ChatMessage("user", "Hello")], max_tokens=1))
        log.info("%s: context of %d tokens: %s", self.manifest.name, n_ctx, layout.reason)
        log.info("%s: %s", self.manifest.name, self.describe_runtime())

    def kv_bytes_per_token(self) -> int:
        """What one token of context costs in the KV cache with this server's cache types
        (all layers, K and V), known once the weights are open: what a context-size default
        divides the memory it may use by."""
        import llama_cpp

        if self._llama is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        return kv_types.bytes_per_token(llama_cpp, self._llama._model.model, *self._kv_types())

    def _kv_types(self) -> tuple[kv_types.KvType, kv_types.KvType]:
        """The KV cache's K and V types (``--cache-type-k/-v``; a bad name is a load error)."""
        return (kv_types.kv_type(self.options.cache_type_k, flag="--cache-type-k"),
                kv_types.kv_type(self.options.cache_type_v, flag="--cache-type-v"))

    def _draft_setting(self) -> str:
        """The engine's ``draft``: ``lookup`` unless told otherwise (``--draft``, or the
        manifest's ``options.draft``), or a draft model's GGUF."""
        draft = self.options.draft if self.options.draft is not None else self.manifest.options.get("draft")
        if draft is None:
            return "lookup"
        if isinstance(draft, str):
            if draft not in ("lookup", "off"):
                raise ModelLoadError(f"draft {draft!r}: use a draft model, 'lookup' or 'off'")
            return draft
        if draft.format != "gguf" or not draft.has_role("weights"):
            raise ModelLoadError(f"the draft model {draft.name!r} is not a GGUF model")
        return str(draft.file_path("weights"))

    def describe_runtime(self) -> str:
        """One line for the log at load: threads, KV cache, drafting."""
        engine = self._running_engine()
        threads = f"threads {engine.n_threads} " + (
            "(adaptive: fewer while other work takes cores; --threads fixes it)"
            if engine.adaptive_threads else "(fixed)"
        )
        footprint = engine.kv_footprint.describe() if engine.kv_footprint else "KV cache unknown"
        return (
            f"{threads}, {footprint}, {self.parallel} sequences, flash attention "
            f"{'on' if self._flash_attn else 'off'}, drafting {engine.drafting}, warm-up {engine.warmup_seconds:.2f} s"
        )

    def runtime_info(self) -> dict[str, Any]:
        """Threads, KV cache and drafting of the loaded model (``GET /v1/models``)."""
        engine = self._engine
        if engine is None:
            return {}
        info: dict[str, Any] = {
            "threads": engine.threads,
            "threads_max": engine.n_threads,
            "threads_adaptive": engine.adaptive_threads,
            "parallel": self.parallel,
            "context_length": engine.n_ctx,
            "flash_attn": self._flash_attn,
            "drafting": engine.drafting,
        }
        fp = engine.kv_footprint
        if fp is not None:
            info["kv_cache"] = {
                "type_k": fp.type_k,
                "type_v": fp.type_v,
                "tokens": fp.cells,
                "bytes": fp.total_bytes,
                "bytes_per_token": fp.bytes_per_token,
            }
        return info

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()  # before the Llama: the engine's context uses its weights
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()  # also frees the mtmd context (registered on the Llama's stack)
        vision, self._vision = self._vision, None
        if vision is not None:
            vision.close()  # after the context that could call its abort callback

    def _special_text(self, token: int) -> str:
        if token < 0 or self._llama is None:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", "ignore")

    # --- chat ------------------------------------------------------------------------

    def chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        if request.has_images:
            with self._lock:
                yield from self._image_chat(request, cancel)
            return
        plan, job = self.prepare_text(request)
        yield from self._run_engine(job, self.chunker(request, plan, len(job.prompt_tokens)), cancel)

    def complete(self, request: CompletionRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        """A legacy text completion on the engine: no template, no reasoning split, no tools."""
        from nexa_llama_cpp.engine import GenerationRequest

        engine = self._running_engine()
        tokens = self._builder().completion(request, engine.n_vocab, self._fim_tokens() if request.suffix else None)
        try:
            sampling = fit_context(request.sampling, len(tokens), self.layout())
        except ContextLengthExceeded as exc:
            exc.param = "prompt"  # the completion's own field
            raise
        job = GenerationRequest(tokens, sampling, logprobs=request.logprobs)
        yield from self._run_engine(job, AnswerChunker(len(tokens), (), sampling.stop), cancel)

    def _run_engine(self, job: GenerationRequest, chunker: AnswerChunker, cancel: CancelToken) -> Iterator[ChatChunk]:
        events = self._running_engine().generate(job, cancel)
        try:
            for event in events:
                yield from chunker.take_all([event, *events.ready()])
                if chunker.stopped:
                    events.finish()
                    break
        finally:
            events.close()  # leaving early (client gone, cancel) cancels the sequence
        yield from chunker.finish()

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Text chats stream from the engine's thread straight to the event loop; image
        chats run ``chat`` on the model's worker thread (the base class)."""
        if request.has_images:
            async for chunk in super().stream_chat(request):
                yield chunk
            return
        loop = asyncio.get_running_loop()
        # Template rendering and tokenizing take milliseconds on a long conversation:
        # off the event loop, on the model's worker thread.
        plan, job = await loop.run_in_executor(self._executor, self.prepare_text, request)
        chunker = self.chunker(request, plan, len(job.prompt_tokens))
        events = self._running_engine().agenerate(job)
        try:
            async for event in events:
                # A guessed step's tokens arrive together: they leave as one chunk.
                for chunk in chunker.take_all([event, *events.ready()]):
                    yield chunk
                if chunker.stopped:
                    events.finish()
                    break
        finally:
            events.close()  # leaving early (client gone, cancel) cancels the sequence
        for chunk in chunker.finish():
            yield chunk

    def prepare_text(self, request: ChatRequest) -> tuple[ChatPlan, GenerationRequest]:
        """The plan of a text chat and the engine request it becomes."""
        from nexa_llama_cpp.engine import GenerationRequest

        plan, tokens = self._text_prompt(request)
        sampling = fit_context(request.sampling, len(tokens), self.layout())
        return plan, GenerationRequest(tokens, sampling, grammar=plan.grammar, render_special=self._render_special,
                                       logprobs=request.logprobs, steer=self._budget_closer(request, plan))

    def chunker(self, request: ChatRequest, plan: ChatPlan, n_prompt: int) -> AnswerChunker:
        """The chunker of one chat's answer: its thought split off as the request says."""
        splitter = reasoning_for(request.reasoning, self.think_format, plan.position)
        return AnswerChunker(n_prompt, plan.tool_names, request.sampling.stop, splitter=splitter,
                             reasoning=request.reasoning)

    def _budget_closer(self, request: ChatRequest, plan: ChatPlan) -> Callable[[int], list[int]] | None:
        return budget_closer(request.reasoning, self.think_format, plan.position, self._special_text,
                             self._encode_markup)

    def _encode_markup(self, text: str) -> list[int]:
        assert self._llama is not None
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _fim_tokens(self) -> FimTokens | None:
        """The model's fill-in-the-middle tokens: each family's texts that are one token."""
        if self._fim is False:
            llama = self._llama
            assert llama is not None
            found = {}
            for text in {t for triplet in FIM_TRIPLETS for t in triplet}:
                ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                if len(ids) == 1 and self._special_text(ids[0]) == text:
                    found[text] = ids[0]
            self._fim = fim_tokens(found)
        return self._fim  # type: ignore[return-value]

    def _text_prompt(self, request: ChatRequest) -> tuple[ChatPlan, list[int]]:
        prompts = self._builder()
        plan = prompts.plan(request)
        return plan, prompts.tokenize(plan.prompt, plan.shielded)

    def count_prompt_tokens(self, request: ChatRequest) -> int:
        """The prompt's tokens exactly as ``chat`` builds them (template, tools, images),
        whatever its length: a prompt over the context is counted, not refused."""
        if not request.has_images:
            return len(self._text_prompt(request)[1])
        vision = self._vision_chat()
        prompts = self._builder()
        plan = prompts.plan(request, media_marker=vision.media_marker)
        images = [image for m in request.messages for image in m.images]
        with self._lock:
            return vision.count_tokens(plan.prompt, plan.shielded, images, prompts)

    def _vision_chat(self) -> ImageChat:
        if self._vision is None:
            raise UnsupportedTask(
                f"model {self.manifest.name!r} has no vision projector (mmproj) and cannot read images",
                param="messages",
            )
        return self._vision

    def _image_chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        vision = self._vision_chat()
        prompts = self._builder()
        plan = prompts.plan(request, media_marker=vision.media_marker)
        images = [image for m in request.messages for image in m.images]
        n_prompt, events = vision.generate(
            plan.prompt, plan.shielded, images, prompts, request.sampling, plan.grammar, cancel,
            logprobs=request.logprobs, steer=self._budget_closer(request, plan), render_special=self._render_special,
        )
        chunker = self.chunker(request, plan, n_prompt)
        try:
            for event in events:
                yield from chunker.take(event)
                if chunker.stopped:
                    break
        finally:
            events.close()  # stops generating when we leave early
        yield from chunker.finish()

    def _builder(self) -> PromptBuilder:
        if self._prompts is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        return self._prompts

    def _running_engine(self) -> BatchEngine:
        if self._engine is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        return self._engine

    # --- observability ---------------------------------------------------------------

    def engine_stats(self) -> EngineStats | None:
        """The batching engine's counters (``engine.EngineStats``), None before load."""
        return self._engine.stats() if self._engine is not None else None

    def runtime_metrics(self) -> list[BackendMetric]:
        """The batching engine's gauges and counters for ``/metrics``."""
        stats = self.engine_stats()
        if stats is None:
            return []
        return [
            BackendMetric(name, getattr(stats, field), kind, text)
            for name, field, kind, text in _ENGINE_METRICS
        ]


# (metric name, EngineStats field, kind, help) exported as nexa_backend_<name>.
_ENGINE_METRICS = (
    ("engine_sequences_max", "n_seq", "gauge", "Sequences the batching engine runs at once"),
    ("engine_kv_cells", "kv_size", "gauge", "KV cache cells of the batching engine"),
    ("engine_active_sequences", "active_sequences", "gauge", "Sequences generating or reading their prompt now"),
    ("engine_waiting_requests", "waiting_requests", "gauge", "Requests waiting for a sequence or KV room"),
    ("engine_kv_cells_reserved", "kv_cells_reserved", "gauge", "KV cells promised to running sequences"),
    ("engine_requests_started", "requests_started", "counter", "Requests the engine began"),
    ("engine_requests_finished", "requests_finished", "counter", "Requests that ended normally"),
    ("engine_requests_cancelled", "requests_cancelled", "counter", "Requests cancelled (disconnect, timeout)"),
    ("engine_prompt_tokens_evaluated", "prompt_tokens_evaluated", "counter", "Prompt tokens computed"),
    ("engine_prompt_tokens_reused", "prompt_tokens_reused", "counter", "Prompt tokens served from cached prefixes"),
    ("engine_tokens_generated", "tokens_generated", "counter", "Tokens generated"),
    ("engine_decode_steps", "decode_steps", "counter", "llama_decode calls"),
    ("engine_embed_requests", "embed_requests", "counter", "Embedding requests run on the chat model"),
    ("engine_tokens_drafted", "tokens_drafted", "counter", "Guessed tokens checked by speculative decoding"),
    ("engine_tokens_accepted", "tokens_accepted", "counter", "Guessed tokens that were right"),
    ("engine_draft_acceptance", "draft_acceptance", "gauge", "Share of guessed tokens that were right"),
    ("engine_threads", "threads", "gauge", "CPU threads the engine decodes with now"),
    ("engine_threads_given_back", "threads_given_back", "counter", "Times contention made the engine drop a thread"),
)

__all__ = ["DEFAULT_PARALLEL", "LlamaCppBackend", "special_texts"]
