"""The llama.cpp backend: chat, vision chat and embeddings on GGUF models.

One ``LlamaCppBackend`` is one loaded GGUF (plus its ``mmproj`` for vision) driven
through llama-cpp-python, always from the model's own worker thread. The chat path is
layered so each concern lives in one place:

1. ``_plan``: the GGUF's chat template rendered in the Jinja sandboxed environment
   (``chat_template``), tools given to the template (or described in a system prompt
   when the template ignores them), the grammar for forced tool calls and
   ``response_format``.
2. Prompt tokens: text is tokenized here; for images, MTMD tokenizes and evaluates the
   prompt with the images (``_prefill_images``), fed with the images' bytes only.
3. ``_generate(prompt_tokens, sampling, cancel)``: **the one generation boundary** for
   text chat. It yields ``(text, None)`` once per generated token (text may be empty
   while a UTF-8 character is incomplete) and finally ``(text, finish_reason)`` with
   ``"stop"`` (end-of-generation token) or ``"length"``, which is not a token. Closing
   the iterator early must stop generation and free the sequence. A batching engine
   can replace this method alone; everything around it (templates, tools, grammars,
   stop strings, usage) stays. The default is ``_generate_llama`` (high-level
   ``Llama.generate``), which vision chat always uses.
4. ``_chunks``: stop strings (``textstream.StopMatcher``), tool-call parsing
   (``textstream.ToolCallStream``), finish reason and usage.

Heavy imports (llama_cpp, numpy) happen only inside methods.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nexa.backend import Backend, CancelToken, LoadOptions
from nexa.errors import BadRequest, Cancelled, ContextLengthExceeded, ModelLoadError, UnsupportedTask
from nexa.text import StopHoldBack
from nexa.types import (
    BackendMetric,
    ChatChunk,
    ChatMessage,
    ChatRequest,
    Device,
    EmbedRequest,
    EmbedResult,
    ImagePart,
    Manifest,
    ResidentInfo,
    Task,
    ToolCall,
    Usage,
)
from nexa_llama_cpp.chat_template import ChatTemplate
from nexa_llama_cpp.textstream import (
    CLOSE_TAG,
    OPEN_TAG,
    Sampling,
    ToolCallStream,
    tool_functions,
    tools_system_prompt,
)

if TYPE_CHECKING:
    import llama_cpp

log = logging.getLogger(__name__)

DEFAULT_CHAT_CONTEXT = 4096
"""Context when the server sets none: the KV cache of a model's full trained context
(32k-128k) would cost gigabytes for requests that rarely need it."""
DEFAULT_EMBED_CONTEXT = 8192
DEFAULT_PARALLEL = 4
"""Text chats one model runs at once by continuous batching (``nexa_llama_cpp.engine``)
when neither ``nexa serve --parallel`` nor the manifest's ``options.parallel`` says."""
POOLING_RANK = 4
Generation = Iterator[tuple[str, str | None]]


def default_threads() -> int:
    """CPU threads for llama.cpp (decode and prompt) when ``--threads`` is not given.

    Up to 4 CPUs: one fewer than there are (1 on a 2-core machine). Above that: half of
    them, i.e. the physical cores of an SMT machine, which leaves the siblings free.

    Why never all of them: ggml's thread pool meets at a spinning barrier after every
    graph node, so when any other thread needs a core (the server's event loop, another
    model, the user's own programs) one decode thread loses its core and the others spin
    until it is back. On a 2-core machine (SmolLM2-135M Q4_1, Nov 2026, with other work
    running beside it): 2 threads decoded 6.6 tok/s and read prompts at 37 tok/s, 1
    thread 61.7 and 109; with one more busy process, 2 threads fell to 0.6 tok/s, 1
    thread gave 32.7. An idle machine runs 2 threads faster (~94 tok/s decode, ~300 tok/s
    prompt), but a server is rarely alone on its machine; ``--threads`` sets it by hand.
    llama.cpp's own tools default to the physical cores and Ollama likewise, which is
    this rule above 4 CPUs.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    return max(1, n - 1 if n <= 4 else n // 2)


def _library_files() -> list[str]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "lib"
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:
        return []


def missing_device_support(kind: str, library_files: Sequence[str]) -> str | None:
    """Why the installed llama.cpp libraries can't use device ``kind`` (None if they can).

    A CPU-only wheel on a GPU machine would silently run on the CPU; refusing lets a
    backend built for the device win, or tells the user to rebuild. Unknown layouts
    (no library folder found) are given the benefit of the doubt.
    """
    if kind not in ("cuda", "metal") or not library_files:
        return None
    if any(f"ggml-{kind}" in name for name in library_files):
        return None
    return f"llama-cpp-python is installed without {kind} support (rebuild it with {kind} on)"


@attrs.frozen
class _Plan:
    prompt: str
    grammar: str | None
    tool_names: tuple[str, ...]
    """Non-empty when the output is parsed for tool calls."""


class _Chunker:
    """Generated text to ``ChatChunk``s: stop strings (``StopMatcher``), tool-call parsing
    (``ToolCallStream``), the finish reason and usage. Fed by the worker-thread path
    (``_chunks``) and the engine's async path (``stream_chat``) alike."""

    def __init__(self, n_prompt: int, plan: _Plan, stops: Sequence[str]) -> None:
        self.n_prompt = n_prompt
        self.n_generated = 0
        self.reason = "stop"
        self.stopped = False
        """A stop string was found: the caller stops generating."""
        self._stop = StopHoldBack(stops)
        self._tools = ToolCallStream(plan.tool_names) if plan.tool_names else None

    def feed(self, text: str, n_tokens: int) -> list[ChatChunk]:
        """``text`` made by ``n_tokens`` more generated tokens."""
        self.n_generated += n_tokens
        out = self._emit(self._stop.feed(text) if text else "")
        if self._stop.stopped:
            self.stopped = True
            self.reason = "stop"
        return out

    def end(self, reason: str, n_generated: int | None = None) -> None:
        """The generation ended by itself (``stop`` or ``length``)."""
        self.reason = reason
        if n_generated is not None:
            self.n_generated = n_generated

    def finish(self) -> list[ChatChunk]:
        out = self._emit(self._stop.flush())
        reason = self.reason
        if self._tools is not None:
            out.extend(_chunk_of(event) for event in self._tools.finish())
            if self._tools.calls:
                reason = "tool_calls"
        out.append(ChatChunk(finish_reason=reason, usage=Usage(self.n_prompt, self.n_generated)))
        return out

    def _emit(self, text: str) -> list[ChatChunk]:
        if not text:
            return []
        if self._tools is None:
            return [ChatChunk(content=text)]
        return [_chunk_of(event) for event in self._tools.feed(text)]


class LlamaCppBackend(Backend):
    """GGUF models on llama.cpp: chat (with tools and JSON grammars), vision, embeddings."""

    name = "llama-cpp"
    tasks = frozenset({Task.CHAT, Task.VLM, Task.EMBED})
    formats = frozenset({"gguf"})
    devices = frozenset({"cpu", "cuda", "metal"})
    parallel = DEFAULT_PARALLEL
    priority = 10
    stops_natively = True
    honours_context_length = True

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        if not manifest.has_role("weights"):
            return "the model has no GGUF weights file"
        if Task.VLM in manifest.tasks and not manifest.has_role("mmproj"):
            return "vision needs an mmproj GGUF beside the model, and this model has none"
        if manifest.options.get("pooling_type") == POOLING_RANK:
            return "reranking models (pooling type rank) are not served"
        return missing_device_support(device.kind, _library_files())

    def __init__(self, manifest: Manifest, device: Device, options: LoadOptions | None = None):
        options = options or LoadOptions()
        self.requested_parallel = options.parallel
        is_embedder = Task.EMBED in manifest.tasks and Task.CHAT not in manifest.tasks
        # Text chat runs on the batching engine, N at once; `--parallel 1` or
        # LoadOptions.extra["batching"] = False keep one request at a time on Llama.
        parallel = options.parallel or int(manifest.options.get("parallel") or self.parallel)
        self.batching = not is_embedder and parallel > 1 and options.extra.get("batching", True) is not False
        super().__init__(manifest, device, attrs.evolve(options, parallel=parallel if self.batching else 1))
        self._engine: Any = None
        self._abort: Any = None
        self._llama: llama_cpp.Llama | None = None
        self._template: ChatTemplate | None = None
        self._mtmd: Any = None
        self._media_marker = ""
        self._bos_text = ""
        self._pieces: dict[int, bytes] = {}
        self._kv_has_images = False
        self._lock = threading.Lock()
        self.is_embedder = Task.EMBED in manifest.tasks and Task.CHAT not in manifest.tasks
        self.text_context = 0
        """Tokens a text chat's prompt and answer share (set by ``load``)."""

    # --- loading ---------------------------------------------------------------------

    def context_length(self) -> int:
        """n_ctx: the server's override, else the trained context capped at a default."""
        if self.options.context_length:
            return int(self.options.context_length)
        trained = self.manifest.context_length or 0
        cap = DEFAULT_EMBED_CONTEXT if self.is_embedder else DEFAULT_CHAT_CONTEXT
        return min(trained, cap) if trained > 0 else (512 if self.is_embedder else cap)

    def load(self) -> None:
        import llama_cpp

        from nexa_llama_cpp.engine import route_native_logs

        route_native_logs()
        path = self.manifest.file_path("weights")
        n_ctx = self.context_length()
        threads = self.options.threads or default_threads()
        kwargs: dict[str, Any] = {
            "n_ctx": n_ctx,
            "n_threads": threads,
            # Prompt batches too: all cores collapse under the same contention (see
            # default_threads), and llama.cpp's default is the same count for both.
            "n_threads_batch": threads,
            "n_gpu_layers": -1 if self.device.kind in ("cuda", "metal") else 0,
            # `--device cpu` on a GPU build: llama.cpp would still send large prompt
            # batches to the GPU ("op offload"); cpu means the CPU alone.
            "op_offload": self.device.kind != "cpu",
            "verbose": False,
        }
        # Flash attention for chat, as llama.cpp's server does by default ("auto"); the
        # manifest's options.flash_attn = false turns it off (engine.BatchEngine._load).
        flash_attn = self.manifest.options.get("flash_attn", True) is not False
        if self.is_embedder:
            # Non-causal encoders need each input whole in one micro-batch.
            kwargs.update(embedding=True, n_batch=n_ctx, n_ubatch=n_ctx)
            if "pooling_type" not in self.manifest.options:
                # No pooling in the GGUF: mean pooling rather than per-token vectors.
                kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        elif self.manifest.has_role("mmproj"):
            # Some projectors (Gemma 3) attend bidirectionally over an image's tokens,
            # which must then fit one micro-batch; 2048 is llama-server's default.
            kwargs.update(n_batch=min(2048, n_ctx), n_ubatch=min(2048, n_ctx))
        elif self.batching:
            # Every chat runs on the engine's own context; the library's is used only to
            # tokenize. Its KV cache at full size would be memory never touched (on the
            # GPU when offloaded: 600 MB for an 8B model at 4096 tokens). 256 is the
            # least llama.cpp allocates.
            kwargs.update(n_ctx=min(n_ctx, 256), n_batch=min(256, n_ctx))
        else:
            kwargs.update(n_batch=min(512, n_ctx))
        if not self.is_embedder:
            kwargs["flash_attn"] = flash_attn
        try:
            self._llama = llama_cpp.Llama(str(path), **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {path.name} for {self.manifest.name!r}: {exc}"
            ) from exc
        if self.is_embedder:
            if self._llama.pooling_type() == POOLING_RANK:
                raise ModelLoadError(f"{self.manifest.name!r} is a reranker, not an embedding model")
            return
        llama = self._llama
        # The engine holds n_ctx per sequence; the library rounds its own context up.
        self.text_context = n_ctx if self.batching else llama.n_ctx()
        import llama_cpp.llama_cpp as lib

        from nexa_llama_cpp.engine import PrefillAbort

        self._abort = PrefillAbort(lib, llama._ctx.ctx)
        self._bos_text = self._special_text(llama.token_bos())
        source = self.manifest.options.get("chat_template") or llama.metadata.get(
            "tokenizer.chat_template"
        )
        self._template = ChatTemplate(
            source, bos_token=self._bos_text, eos_token=self._special_text(llama.token_eos())
        )
        if self._template.is_fallback:
            log.warning("%s has no chat template; using ChatML", self.manifest.name)
        if self.manifest.has_role("mmproj"):
            self._load_mmproj(self.manifest.file_path("mmproj"))
        if self.batching:
            from nexa_llama_cpp.engine import BatchEngine

            # Same weights (no second load), its own context with one KV sequence per slot.
            self._engine = BatchEngine(
                model=llama._model.model,
                n_seq=self.parallel,
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=kwargs["n_threads_batch"],
                n_batch=min(512, n_ctx),
                flash_attn=flash_attn,
                op_offload=kwargs["op_offload"],
            )
            self._engine.start()

    def _load_mmproj(self, path: Path) -> None:
        import llama_cpp.mtmd_cpp as mtmd_cpp
        from llama_cpp.llama_chat_format import MTMDChatHandler

        class BytesOnlyMTMD(MTMDChatHandler):
            def load_image(self, image_url: str) -> bytes:
                # The library fetches any non-data URL with urlopen (local files, SSRF).
                # This backend hands it decoded bytes only; anything else is refused.
                if not image_url.startswith("data:"):
                    raise BadRequest("images reach the model only as data URIs")
                return super().load_image(image_url)

        handler = BytesOnlyMTMD(
            clip_model_path=str(path), verbose=False, use_gpu=self.device.kind != "cpu"
        )
        try:
            handler._init_mtmd_context(self._llama)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"the mmproj {path.name} could not be loaded: {exc}") from exc
        self._mtmd = handler
        self._media_marker = mtmd_cpp.mtmd_default_marker().decode("utf-8")

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()  # before the Llama: the engine's context uses its weights
        llama, self._llama, self._mtmd = self._llama, None, None
        if llama is not None:
            llama.close()  # also frees the mtmd context (registered on the Llama's stack)
        if self._abort is not None:
            self._abort.close()
        self._abort = None  # after the context that could call it

    # --- small helpers ---------------------------------------------------------------

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", "ignore")

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            import llama_cpp

            vocab = self._llama._model.vocab
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, False)
            piece = buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Tokens of a rendered prompt; BOS added unless the template already wrote it."""
        add_special = not (self._bos_text and prompt.startswith(self._bos_text))
        return self._llama.tokenize(prompt.encode("utf-8"), add_bos=add_special, special=True)

    def _sampling(self, request: ChatRequest, n_prompt: int, grammar: str | None) -> Sampling:
        n_ctx = self.text_context
        if n_prompt >= n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, your "
                f"messages resulted in {n_prompt} tokens. Shorten the messages, or serve "
                "the model with a larger context.",
                param="messages",
            )
        room = n_ctx - n_prompt
        wanted = request.sampling
        return Sampling(
            max_tokens=min(wanted.max_tokens or room, room),
            temperature=max(0.0, wanted.temperature),
            top_p=wanted.top_p,
            top_k=wanted.top_k,
            min_p=wanted.min_p,
            seed=wanted.seed,
            presence_penalty=wanted.presence_penalty,
            frequency_penalty=wanted.frequency_penalty,
            repeat_penalty=wanted.repeat_penalty,
            grammar=grammar,
        )

    # --- chat ------------------------------------------------------------------------

    def chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        if self.is_embedder or self._template is None:
            raise UnsupportedTask(
                f"model {self.manifest.name!r} is an embedding model and cannot chat"
            )
        if self._engine is not None and not request.has_images:
            # Batched: the engine serializes what needs serializing; no lock.
            yield from self._chat_locked(request, cancel)
            return
        with self._lock:
            yield from self._chat_locked(request, cancel)

    def _chat_locked(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        images = [img for m in request.messages for img in m.images]
        if images and self._mtmd is None:
            raise UnsupportedTask(
                f"model {self.manifest.name!r} has no vision projector (mmproj) and "
                "cannot read images",
                param="messages",
            )
        plan = self._plan(request, with_images=bool(images))
        if images:
            prompt_tokens = self._prefill_images(plan.prompt, images, cancel)
            sampling = self._sampling(request, len(prompt_tokens), plan.grammar)
            pieces = self._generate_llama(prompt_tokens, sampling, cancel, prefilled=True)
        else:
            prompt_tokens = self.tokenize_prompt(plan.prompt)
            sampling = self._sampling(request, len(prompt_tokens), plan.grammar)
            pieces = self._generate(prompt_tokens, sampling, cancel)
        yield from self._chunks(pieces, len(prompt_tokens), plan, request.sampling.stop)

    def _plan(self, request: ChatRequest, *, with_images: bool) -> _Plan:
        template = self._template
        assert template is not None
        choice = request.tool_choice
        named: str | None = None
        if isinstance(choice, Mapping):
            function = choice.get("function")
            named = function.get("name") if isinstance(function, Mapping) else None
            if not named:
                raise BadRequest("tool_choice must name a function", param="tool_choice")
            choice = "named"
        elif choice is None:
            choice = "auto"
        elif choice not in ("auto", "none", "required"):
            raise BadRequest(f"unknown tool_choice {choice!r}", param="tool_choice")
        tools = tuple(request.tools) if choice != "none" else ()
        if choice in ("required", "named") and not tools:
            raise BadRequest(f"tool_choice {choice!r} needs tools", param="tool_choice")

        messages = tuple(request.messages)
        template_tools = None
        if tools:
            if template.caps.tools:
                template_tools = tools
            else:
                messages = _describe_tools(messages, tools)
        prompt = template.render(
            messages,
            tools=template_tools,
            media_marker=self._media_marker if with_images else None,
        )

        grammar = None
        if choice in ("required", "named"):
            from nexa_llama_cpp.grammar import forced_call_gbnf

            # Our own tool prompt teaches the tagged form too.
            tagged = template.caps.tool_call_tags or not template.caps.tools
            grammar = forced_call_gbnf(tools, named, tagged=tagged)
        elif request.response_format:
            from nexa_llama_cpp.grammar import response_format_gbnf

            grammar = response_format_gbnf(request.response_format)
        names = tuple(f.get("name", "") for f in tool_functions(tools))
        return _Plan(prompt=prompt, grammar=grammar, tool_names=names)

    def _chunks(
        self, pieces: Generation, n_prompt: int, plan: _Plan, stops: Sequence[str]
    ) -> Iterator[ChatChunk]:
        chunker = _Chunker(n_prompt, plan, stops)
        try:
            for text, reason in pieces:
                yield from chunker.feed(text, 1 if reason is None else 0)
                if chunker.stopped:
                    break
                if reason is not None:
                    chunker.end(reason)
                    break
        finally:
            # Stops generation when we leave early (stop string, cancel, client gone).
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        yield from chunker.finish()

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Text chat on the batching engine streams from the engine's thread straight to
        the event loop; everything else goes through the model's worker thread (the base
        class). The worker-thread hop costs a thread wake-up per token, a few percent of
        decode speed on a small model (docs/benchmarks.md)."""
        if self._engine is None or request.has_images:
            async for chunk in super().stream_chat(request):
                yield chunk
            return
        from nexa_llama_cpp.engine import GenerationRequest, TextPiece

        loop = asyncio.get_running_loop()
        # Template rendering and tokenizing take milliseconds on a long conversation:
        # off the event loop, on the model's worker thread.
        plan, prompt_tokens, sampling = await loop.run_in_executor(self._executor, self._prepare_text, request)
        chunker = _Chunker(len(prompt_tokens), plan, request.sampling.stop)
        events = self._engine.agenerate(GenerationRequest.from_sampling(prompt_tokens, sampling))
        try:
            async for event in events:
                if isinstance(event, TextPiece):
                    for chunk in chunker.feed(event.text, event.n_tokens):
                        yield chunk
                    if chunker.stopped:
                        break
                else:
                    chunker.end(event.finish_reason, event.completion_tokens)
        finally:
            # Closing the engine's stream cancels the sequence (stop string, client gone).
            await events.aclose()
        for chunk in chunker.finish():
            yield chunk

    def _prepare_text(self, request: ChatRequest) -> tuple[_Plan, list[int], Sampling]:
        """Plan, prompt tokens and sampling of a text chat (no images) for the engine."""
        if self.is_embedder or self._template is None:
            raise UnsupportedTask(
                f"model {self.manifest.name!r} is an embedding model and cannot chat"
            )
        plan = self._plan(request, with_images=False)
        prompt_tokens = self.tokenize_prompt(plan.prompt)
        return plan, prompt_tokens, self._sampling(request, len(prompt_tokens), plan.grammar)

    # --- generation ------------------------------------------------------------------

    def _generate(self, prompt_tokens: list[int], sampling: Sampling, cancel: CancelToken) -> Generation:
        """The text-chat generation boundary (see the module docstring)."""
        if self._engine is not None:
            from nexa_llama_cpp.engine import GenerationRequest

            return self._engine.token_stream(GenerationRequest.from_sampling(prompt_tokens, sampling), cancel)
        return self._generate_llama(prompt_tokens, sampling, cancel)

    def engine_stats(self) -> Any:
        """The batching engine's counters (``engine.EngineStats``), None when batching is off."""
        return self._engine.stats() if self._engine is not None else None

    def runtime_metrics(self) -> list[BackendMetric]:
        """The batching engine's gauges and counters for ``/metrics`` (none when batching is off)."""
        stats = self.engine_stats()
        if stats is None:
            return []
        return [
            BackendMetric(name, getattr(stats, field), kind, text)
            for name, field, kind, text in _ENGINE_METRICS
        ]

    def resident_info(self) -> ResidentInfo:
        """The KV cache from the model's shape: cells of this model's llama.cpp contexts x
        layers x (key + value width of the KV heads) x 2 bytes (f16, the cache type used)."""
        info = super().resident_info()
        llama = self._llama
        if llama is None:
            return info
        import llama_cpp

        model, meta = llama._model.model, llama.metadata
        arch = meta.get("general.architecture", "")
        head_dim = llama_cpp.llama_model_n_embd(model) // max(1, llama_cpp.llama_model_n_head(model))
        width = llama_cpp.llama_model_n_head_kv(model) * (
            int(meta.get(f"{arch}.attention.key_length", head_dim)) + int(meta.get(f"{arch}.attention.value_length", head_dim)))
        # Encoders (BERT-like embedders) have no KV memory at all.
        cells = (llama.n_ctx() if llama_cpp.llama_get_memory(llama._ctx.ctx) else 0) + (
            self._engine.kv_size if self._engine is not None else 0)
        return attrs.evolve(info, kv_cache_bytes=cells * llama_cpp.llama_model_n_layer(model) * width * 2,
                            context=self.text_context or llama.n_ctx())

    def _prefill(self, prompt: list[int], cancel: CancelToken) -> None:
        """Evaluate ``prompt`` into the KV cache, reusing the longest cached prefix.

        Done here rather than inside ``Llama.generate`` so a long prompt can be
        cancelled, within a batch too (``_eval``). At least the last prompt token is
        always evaluated, so sampling starts from fresh logits.
        """
        llama = self._llama
        keep = 0
        if not self._kv_has_images:
            cached = llama.input_ids[: llama.n_tokens]
            limit = min(len(cached), len(prompt) - 1)
            while keep < limit and cached[keep] == prompt[keep]:
                keep += 1
        if keep == 0 or not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0
            llama.reset()
            llama._ctx.kv_cache_clear()
        self._kv_has_images = False
        llama.n_tokens = keep
        for start in range(keep, len(prompt), llama.n_batch):
            cancel.raise_if_cancelled()
            self._eval(prompt[start : start + llama.n_batch], cancel)

    def _eval(self, tokens: list[int], cancel: CancelToken) -> None:
        """``Llama.eval`` of prompt tokens that a cancel stops mid-batch (llama.cpp's abort
        callback, armed for prompt batches only: see ``engine.PrefillAbort``)."""
        llama = self._llama
        try:
            with self._abort.armed(lambda: cancel.cancelled):
                llama.eval(tokens)
        except RuntimeError:
            if not cancel.cancelled:
                raise
            self._after_abort()
            raise Cancelled() from None

    def _after_abort(self) -> None:
        # An aborted decode leaves n_tokens/input_ids at the last whole batch; make the
        # KV cache say the same, so the next request's prefix reuse stays true.
        llama = self._llama
        llama._ctx.kv_cache_seq_rm(-1, llama.n_tokens, -1)

    def _generate_llama(
        self,
        prompt_tokens: list[int],
        sampling: Sampling,
        cancel: CancelToken,
        *,
        prefilled: bool = False,
    ) -> Generation:
        import llama_cpp
        from llama_cpp.llama_grammar import LlamaGrammar

        llama = self._llama
        grammar = None
        if sampling.grammar:
            _check_grammar(llama, sampling.grammar)
            grammar = LlamaGrammar.from_string(sampling.grammar, verbose=False)
        if not prefilled:
            self._prefill(prompt_tokens, cancel)
        llama.set_seed(sampling.seed if sampling.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        vocab = llama._model.vocab
        is_eog = llama_cpp.llama_vocab_is_eog
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        # The prompt is in the KV cache, so generate() samples at once, no re-evaluation.
        tokens = llama.generate(
            prompt_tokens,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            typical_p=1.0,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            grammar=grammar,
        )
        return self._decode_tokens(tokens, sampling.max_tokens, cancel, vocab, is_eog, decoder)

    def _decode_tokens(
        self, tokens: Iterator[int], max_tokens: int, cancel: CancelToken, vocab: Any,
        is_eog: Any, decoder: codecs.IncrementalDecoder,
    ) -> Generation:
        n = 0
        try:
            for token in tokens:
                if is_eog(vocab, token):
                    yield _drop_partial(decoder), "stop"
                    return
                n += 1
                yield decoder.decode(self._piece(token)), None
                if n >= max_tokens:
                    yield _drop_partial(decoder), "length"
                    return
                # Checked before the next decode: a disconnect costs at most this token.
                cancel.raise_if_cancelled()
        finally:
            tokens.close()  # type: ignore[attr-defined]

    # --- vision ----------------------------------------------------------------------

    def _prefill_images(
        self, prompt: str, images: Sequence[ImagePart], cancel: CancelToken
    ) -> list[int]:
        """Tokenize text + images with MTMD and evaluate them; the prompt's token ids.

        Images go to the library as their bytes (``mtmd_helper_bitmap_init_from_buf``),
        never as a URL or path.
        """
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        llama = self._llama
        handler = self._mtmd
        bitmaps = []
        try:
            for i, image in enumerate(images):
                try:
                    bitmaps.append(handler._create_bitmap_from_bytes(image.data))
                except ValueError as exc:
                    raise BadRequest(
                        f"image {i + 1} could not be decoded ({image.mime})", param="messages"
                    ) from exc
            text = prompt.encode("utf-8")
            input_text = mtmd.mtmd_input_text()
            input_text.text = text
            input_text.text_len = len(text)
            input_text.add_special = not (self._bos_text and prompt.startswith(self._bos_text))
            input_text.parse_special = True
            chunks = mtmd.mtmd_input_chunks_init()
            if chunks is None:
                raise RuntimeError("mtmd_input_chunks_init failed")
            try:
                array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
                rc = mtmd.mtmd_tokenize(
                    handler.mtmd_ctx, chunks, ctypes.byref(input_text), array, len(bitmaps)
                )
                if rc == 1:
                    raise BadRequest(
                        "the number of images does not match the image markers in the "
                        f"prompt (do not write {self._media_marker!r} in text)",
                        param="messages",
                    )
                if rc != 0:
                    raise BadRequest(f"the images could not be preprocessed (code {rc})",
                                     param="messages")
                n_chunks = mtmd.mtmd_input_chunks_size(chunks)
                parts = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(n_chunks)]
                total = sum(mtmd.mtmd_input_chunk_get_n_tokens(c) for c in parts if c)
                if total >= llama.n_ctx():
                    raise ContextLengthExceeded(
                        f"This model's maximum context length is {llama.n_ctx()} tokens. "
                        f"However, your messages and images resulted in {total} tokens.",
                        param="messages",
                    )
                # Image positions leave stale ids in input_ids: never reuse this cache.
                self._kv_has_images = True
                llama.reset()
                llama._ctx.kv_cache_clear()
                for chunk in parts:
                    if chunk is None:
                        continue
                    cancel.raise_if_cancelled()
                    kind = mtmd.mtmd_input_chunk_get_type(chunk)
                    if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                        count = ctypes.c_size_t()
                        ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                        ids = [ptr[j] for j in range(count.value)]
                        for start in range(0, len(ids), llama.n_batch):
                            cancel.raise_if_cancelled()
                            self._eval(ids[start : start + llama.n_batch], cancel)
                    else:
                        new_past = llama_cpp.llama_pos(0)
                        # The abort stops the image tokens' decode into the model (the
                        # vision encoder itself runs on its own context, unarmed).
                        with self._abort.armed(lambda: cancel.cancelled):
                            rc = mtmd.mtmd_helper_eval_chunk_single(
                                handler.mtmd_ctx, llama._ctx.ctx, chunk,
                                llama_cpp.llama_pos(llama.n_tokens), llama_cpp.llama_seq_id(0),
                                llama.n_batch, False, ctypes.byref(new_past),
                            )
                        if rc != 0:
                            if cancel.cancelled:
                                self._after_abort()
                                raise Cancelled()
                            raise RuntimeError(f"llama.cpp failed to evaluate an image ({rc})")
                        llama.n_tokens = new_past.value
                return llama.input_ids[: llama.n_tokens].tolist()
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    # --- embeddings ------------------------------------------------------------------

    def embed(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        if not self.is_embedder:
            raise UnsupportedTask(
                f"model {self.manifest.name!r} is not an embedding model; use a model made "
                "for embeddings (e.g. a GGUF of jina-embeddings or nomic-embed)",
                param="model",
            )
        with self._lock:
            return self._embed_locked(request, cancel)

    def _embed_locked(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        import llama_cpp
        import numpy as np

        llama = self._llama
        n_ctx = llama.n_ctx()
        n_vocab = llama.n_vocab()
        sequences: list[list[int]] = []
        for i, item in enumerate(request.inputs):
            if isinstance(item, str):
                ids = llama.tokenize(item.encode("utf-8"), add_bos=True, special=False)
            else:
                ids = [int(t) for t in item]
                if any(t < 0 or t >= n_vocab for t in ids):
                    raise BadRequest(
                        f"input {i} has token ids outside the model's vocabulary (0..{n_vocab - 1})",
                        param="input",
                    )
            if not ids:
                raise BadRequest(f"input {i} is empty", param="input")
            if len(ids) > n_ctx:
                raise ContextLengthExceeded(
                    f"input {i} has {len(ids)} tokens; this model's maximum context length "
                    f"is {n_ctx} tokens",
                    param="input",
                )
            sequences.append(ids)

        n_embd = llama.n_embd()
        max_seqs = max(1, int(llama.context_params.n_seq_max))
        vectors: list[tuple[float, ...]] = [()] * len(sequences)

        def run(group: list[int]) -> None:
            cancel.raise_if_cancelled()
            llama._ctx.kv_cache_clear()
            llama._batch.reset()
            for seq, index in enumerate(group):
                llama._batch.add_sequence(sequences[index], seq, True)
            llama._ctx.decode(llama._batch)
            for seq, index in enumerate(group):
                ptr = llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, seq)
                vec = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(vec))
                if norm > 0:
                    vec /= norm
                vectors[index] = tuple(vec.tolist())
            llama._batch.reset()

        # As many inputs per decode as the batch and the sequence limit allow.
        group: list[int] = []
        used = 0
        for index, ids in enumerate(sequences):
            if group and (used + len(ids) > llama.n_batch or len(group) >= max_seqs):
                run(group)
                group, used = [], 0
            group.append(index)
            used += len(ids)
        if group:
            run(group)
        llama._ctx.kv_cache_clear()
        return EmbedResult(vectors=tuple(vectors), prompt_tokens=sum(len(s) for s in sequences))


def _drop_partial(decoder: codecs.IncrementalDecoder) -> str:
    """End of generation: the bytes of a character cut short (by ``max_tokens``) are
    dropped, never shown as U+FFFD; invalid bytes inside the text were already replaced."""
    decoder.reset()
    return ""


def _chunk_of(event: str | ToolCall) -> ChatChunk:
    if isinstance(event, ToolCall):
        return ChatChunk(tool_calls=(event,))
    return ChatChunk(content=event)


def _describe_tools(
    messages: tuple[ChatMessage, ...], tools: Sequence[Mapping[str, Any]]
) -> tuple[ChatMessage, ...]:
    """For templates that ignore ``tools``: a system prompt, and calls/results as text."""
    import json

    instructions = tools_system_prompt(tools)
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = "\n".join(
                f'{OPEN_TAG}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments or "{}"}}}\n{CLOSE_TAG}'
                for c in m.tool_calls
            )
            text = (m.text + "\n" if m.text else "") + calls
            out.append(ChatMessage(role="assistant", content=text))
        elif m.role == "tool":
            out.append(ChatMessage(role="user", content=f"<tool_response>\n{m.text}\n</tool_response>"))
        else:
            out.append(m)
    if out and out[0].role == "system":
        out[0] = ChatMessage(role="system", content=f"{out[0].text}\n\n{instructions}")
    else:
        out.insert(0, ChatMessage(role="system", content=instructions))
    return tuple(out)


def _check_grammar(llama: Any, gbnf: str) -> None:
    """A grammar llama.cpp rejects would crash the sampler chain; refuse it first."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, gbnf.encode(), b"root")
    if not sampler:
        raise BadRequest("the requested output format could not be turned into a grammar")
    llama_cpp.llama_sampler_free(sampler)


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
)

__all__ = ["LlamaCppBackend", "default_threads"]
