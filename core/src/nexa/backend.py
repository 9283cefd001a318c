"""The backend contract: what a plugin subclasses to serve models.

A backend class declares what it serves (tasks, formats, devices, parallelism, priority)
and may refuse a model in ``supports``. An instance is one loaded model. Backend authors
write plain synchronous methods (``load``, ``chat``, ``embed``, ``generate_images``,
``rerank``, ``transcribe``); this base class runs them on the model's own worker
thread(s) and exposes the one async interface the server uses (``stream_chat``,
``run_embed``, ``run_images``, ``run_rerank``, ``stream_transcribe``/``run_transcribe``):
requests in, result chunks out, cancellable. A backend that is natively asynchronous (a batching
engine, a remote worker) overrides the async methods instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, ClassVar

import attrs

from nexa import answer
from nexa.errors import Cancelled, UnsupportedTask
from nexa.types import (
    BackendInfo,
    BackendMetric,
    ChatChunk,
    ChatRequest,
    CompletionRequest,
    ContextPlan,
    Device,
    EmbedRequest,
    EmbedResult,
    ImageRequest,
    ImageResult,
    Manifest,
    RerankRequest,
    RerankResult,
    ResidentInfo,
    Task,
    TranscribeRequest,
    Transcript,
    TranscriptChunk,
)


class CancelToken:
    """Set by the server when the client leaves, the request times out or the server stops.

    Backends check it between units of work (a token, a diffusion step) and stop.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the work to stop (the server calls it; safe from any thread, idempotent)."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether the work should stop now."""
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise ``nexa.errors.Cancelled`` if cancelled; the base class treats it as a
        clean stop, not an error."""
        if self._event.is_set():
            raise Cancelled()


@attrs.frozen
class LoadOptions:
    """Server-wide settings a backend honours when loading a model."""

    context_length: int | None = None
    """Override of the manifest's context length (``nexa serve --ctx``)."""
    parallel: int | None = None
    """Override of the backend's ``parallel`` (``nexa serve --parallel``)."""
    threads: int | None = None
    """CPU threads for inference; None lets the backend choose."""
    draft: Manifest | str | None = None
    """Speculative decoding (``nexa serve --draft``): a draft model's manifest, or a
    backend's own word for a kind of drafting (llama.cpp: ``lookup``, ``off``); None
    lets the backend choose."""
    cache_type_k: str | None = None
    """Data type of the KV cache's keys (``--cache-type-k``: llama.cpp's names, f16, q8_0...)."""
    cache_type_v: str | None = None
    """...and of its values (``--cache-type-v``)."""
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    """Backend-specific settings by name, for scripts and tests that build a backend
    themselves (the server sets none): ``dtype`` (diffusers), ``truncate``
    (sentence-transformers), ``batching`` (llama.cpp)..."""


class Backend:
    """Base class of every backend. Subclass it, set the class attributes, override methods."""

    name: ClassVar[str] = ""
    """The backend's name: shown by ``nexa plugins``, pinned by ``nexa serve --backend`` and
    a manifest's ``backend``."""
    tasks: ClassVar[frozenset[Task]] = frozenset()
    """The tasks it serves; register the class through each task's hook."""
    formats: ClassVar[frozenset[str]] = frozenset()
    """The manifest ``format`` values it reads."""
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    """The device kinds it runs on: ``cpu``, ``cuda``, ``metal``."""
    parallel: int = 1
    """How many requests one loaded model runs at once (its worker threads). The class
    value is the backend's default; an instance holds the count it really runs with
    (``nexa serve --parallel`` overrides it through ``LoadOptions.parallel``)."""
    priority: ClassVar[int] = 0
    """Higher wins when several backends support a model."""
    load_settings: ClassVar[frozenset[str]] = frozenset()
    """The optional ``LoadOptions`` fields this backend honours (``draft``,
    ``cache_type_k``, ``cache_type_v``); the server drops the others, with a warning, before
    they reach it."""
    honours_context_length: ClassVar[bool] = False
    """True when the backend sizes its context from ``LoadOptions.context_length``
    (``nexa serve --ctx``, a load's ``context``); a load asking others for a context is refused."""
    stops_natively: ClassVar[bool] = False
    """True when ``chat`` itself ends the answer at ``request.sampling.stop`` strings (with
    ``nexa.text.StopHoldBack``), stopping generation at once and counting tokens exactly.
    False: the server cuts the answer at the first stop string and closes the stream;
    usage then counts one completion token per chunk received."""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    """Request features the backend honours beyond the basics; the server refuses the others
    with a 400 naming the field (``nexa.answer``):

    - ``reasoning``: renders its chat template with ``nexa.reasoning.template_kwargs``,
      splits the thought itself (``ChatChunk.reasoning``, ``Usage.reasoning_tokens``) and
      honours ``request.reasoning`` (on/off, effort, budget, format). Without it the
      server splits a ``<think>`` thought off the content and refuses the switches;
    - ``logprobs``: fills ``ChatChunk.logprobs`` when ``request.logprobs`` is set;
    - ``logit_bias``: applies ``request.sampling.logit_bias``."""

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        """Return None if this backend can serve ``manifest`` on ``device``, else the reason why not.

        Called only after tasks, formats and devices matched; must be cheap (no model load,
        no heavy import).
        """
        return None

    @classmethod
    def info(cls, plugin: str = "") -> BackendInfo:
        """What the class declares, for ``nexa plugins`` and ``GET /v1/plugins``."""
        return BackendInfo(
            name=cls.name,
            tasks=cls.tasks,
            formats=cls.formats,
            devices=cls.devices,
            parallel=cls.parallel,
            priority=cls.priority,
            plugin=plugin,
        )

    def __init__(self, manifest: Manifest, device: Device, options: LoadOptions | None = None):
        self.manifest = manifest
        self.device = device
        self.options = options or LoadOptions()
        self.parallel = self.options.parallel or type(self).parallel
        # Long-lived worker threads: llama.cpp and torch are fastest when one model is
        # always driven from the same thread(s), and load happens on them too.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.parallel, thread_name_prefix=f"nexa-{self.name}"
        )

    # --- synchronous methods backend authors override --------------------------------

    def load(self) -> None:
        """Load the model's weights. Runs on a worker thread; raise to report a bad model."""

    def close(self) -> None:
        """Free the model. Called once, after the last request finished."""

    def chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        """Yield the answer piece by piece; the last chunk has ``finish_reason`` and ``usage``."""
        raise UnsupportedTask(f"model {self.manifest.name!r} does not support chat")

    def complete(self, request: CompletionRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        """Continue raw text (``POST /v1/completions``): chunks with ``content`` only, the last
        with ``finish_reason`` and ``usage``; fill in the middle when ``request.suffix`` is set."""
        raise UnsupportedTask(f"model {self.manifest.name!r} does not support text completions")

    def embed(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        """Return one L2-normalised vector per input."""
        raise UnsupportedTask(f"model {self.manifest.name!r} is not an embedding model")

    def generate_images(self, request: ImageRequest, cancel: CancelToken) -> ImageResult:
        """Return ``request.n`` PNG images."""
        raise UnsupportedTask(f"model {self.manifest.name!r} does not generate images")

    def runtime_info(self) -> Mapping[str, Any]:
        """What this loaded model runs with (threads, cache sizes...), shown with the model
        in ``GET /v1/models``. Called on the event loop: numbers at hand, JSON values only."""
        return {}

    def count_prompt_tokens(self, request: ChatRequest) -> int:
        """How many tokens ``request`` is as a prompt: its messages and tools rendered with
        the model's chat template and tokenized exactly as ``chat`` would, without
        generating (``POST /v1/messages/count_tokens``). Runs on a worker thread."""
        raise UnsupportedTask(f"model {self.manifest.name!r} (backend {self.name}) cannot count prompt tokens")

    def rerank(self, request: RerankRequest, cancel: CancelToken) -> RerankResult:
        """Score every document against the query in batches (never one pass per document):
        a cross-encoder returns the sigmoid of its logit, a bi-encoder cosine similarity."""
        raise UnsupportedTask(f"model {self.manifest.name!r} is not a reranker")

    def transcribe(self, request: TranscribeRequest, cancel: CancelToken) -> Iterator[TranscriptChunk]:
        """Yield one chunk per segment as each window of the audio is decoded, then a last
        chunk with ``done=True`` and the language. Check ``cancel`` between windows."""
        raise UnsupportedTask(f"model {self.manifest.name!r} does not transcribe speech")

    def context_plan(self) -> ContextPlan | None:
        """The context this model gets and why; None when the backend has no fixed
        context. Asked of a backend made but not loaded (``nexa show``: may read the
        model's files) and of a loaded one (``GET /v1/models``, on the event loop: keep
        the plan made at load and return it)."""
        return None

    def runtime_metrics(self) -> list[BackendMetric]:
        """Figures about this loaded model for ``GET /metrics`` (a batching engine's active
        sequences, cache reuse...). Called on the event loop at each scrape: return numbers
        already at hand, never block. The server already counts requests, tokens and
        latency for every backend; report only what only the backend knows."""
        return []

    def resident_info(self) -> ResidentInfo:
        """What this loaded model holds in memory, for ``GET /v1/admin/models``. Called on
        the event loop: return figures at hand, never block. The default knows the files'
        size and the context asked for; a backend that holds a KV cache says how big."""
        return ResidentInfo(
            device=self.device.kind,
            weights_bytes=self.manifest.size,
            context=(self.honours_context_length and self.options.context_length) or self.manifest.context_length,
        )

    # --- the async interface the server uses -----------------------------------------

    async def start(self) -> None:
        """Load off the event loop, on the worker thread that will run requests."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    async def stop(self) -> None:
        """Run ``close`` on the worker thread, then let the worker threads go."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.close)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def stream_chat(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Chunks of the answer; closing the iterator (or cancelling) cancels the work.
        An override may be an ``async def`` generator."""
        # The worker's own generator, not a wrapper around it: closing it must stop the
        # worker before ``aclose`` returns (a wrapper would leave the inner one to the GC).
        return self._stream_on_worker(self.chat, request)

    def stream_completion(self, request: CompletionRequest) -> AsyncIterator[ChatChunk]:
        """Chunks of a text completion; closing the iterator cancels the work."""
        if type(self).complete is Backend.complete:
            # No worker is needed to say no (a stand-in for a remote backend has none).
            return _refuse(UnsupportedTask(f"model {self.manifest.name!r} does not support text completions"))
        return self._stream_on_worker(self.complete, request)

    def stream_transcribe(self, request: TranscribeRequest) -> AsyncIterator[TranscriptChunk]:
        """Segments as each window is decoded; closing the iterator cancels the work."""
        return self._stream_on_worker(self.transcribe, request)

    async def _stream_on_worker(self, method: Any, request: Any) -> AsyncIterator[Any]:
        """Run the synchronous generator ``method(request, cancel)`` on the model's worker
        thread and hand its items to the event loop; closing the iterator cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = CancelToken()

        def produce() -> None:
            chunks = None
            try:
                chunks = method(request, cancel)
                for chunk in chunks:
                    loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
                    if cancel.cancelled:
                        break
            except Cancelled:
                pass
            except BaseException as exc:  # handed to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                # Closed here, on the worker, before the slot is freed: a generator gets
                # GeneratorExit at the yield it stopped at and runs its finally blocks now
                # (docs/plugin-guide.md promises this; CPython's refcounting would do it
                # too, but only as a side effect).
                close = getattr(chunks, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception as exc:
                        loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

        done = loop.run_in_executor(self._executor, produce)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "chunk":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            cancel.cancel()
            # The slot is only free once the worker thread has really stopped.
            await asyncio.shield(done)

    async def stream_answer(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """What the server streams for a chat: ``stream_chat`` through the stages the backend
        does not run itself (``nexa.answer``). Not for overriding."""
        answer.refuse_missing(self.name, self.capabilities, logprobs=request.logprobs, sampling=request.sampling)
        chunks = self.stream_chat(request)
        if "reasoning" not in self.capabilities:
            chunks = answer.split_reasoning(chunks, request.reasoning)
        if not self.stops_natively and request.sampling.stop:
            chunks = answer.cut_at_stops(chunks, request.sampling.stop)
        if request.max_tool_calls is not None:
            chunks = answer.limit_tool_calls(chunks, request.max_tool_calls)
        if "reasoning" not in self.capabilities:
            chunks = answer.show_reasoning(chunks, request.reasoning)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def stream_completion_answer(self, request: CompletionRequest) -> AsyncIterator[ChatChunk]:
        """What the server streams for a text completion: ``stream_completion``, cut at stop
        strings when the backend does not stop natively. Not for overriding."""
        answer.refuse_missing(self.name, self.capabilities, logprobs=request.logprobs, sampling=request.sampling)
        chunks = self.stream_completion(request)
        if not self.stops_natively and request.sampling.stop:
            chunks = answer.cut_at_stops(chunks, request.sampling.stop)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def run_count_prompt_tokens(self, request: ChatRequest) -> int:
        """``count_prompt_tokens`` on a worker thread (``/v1/messages/count_tokens``)."""
        return await self._run(lambda req, _cancel: self.count_prompt_tokens(req), request)

    async def run_embed(self, request: EmbedRequest) -> EmbedResult:
        """``embed`` on a worker thread; cancelling the await sets its ``CancelToken``."""
        return await self._run(self.embed, request)

    async def run_images(self, request: ImageRequest) -> ImageResult:
        """``generate_images`` on a worker thread; cancelling the await sets its ``CancelToken``."""
        return await self._run(self.generate_images, request)

    async def run_rerank(self, request: RerankRequest) -> RerankResult:
        """``rerank`` on a worker thread; cancelling the await sets its ``CancelToken``."""
        return await self._run(self.rerank, request)

    async def run_transcribe(self, request: TranscribeRequest) -> Transcript:
        """The whole transcript (``stream_transcribe`` gathered)."""
        segments = []
        language = request.language or ""
        async with contextlib.aclosing(self.stream_transcribe(request)) as chunks:
            async for chunk in chunks:
                if chunk.segment is not None:
                    segments.append(chunk.segment)
                if chunk.language:
                    language = chunk.language
        return Transcript(tuple(segments), language, request.audio.duration)

    async def _run(self, method: Any, request: Any) -> Any:
        cancel = CancelToken()
        future = asyncio.get_running_loop().run_in_executor(self._executor, method, request, cancel)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.cancel()
            try:
                await future
            except BaseException:
                pass
            raise


async def _refuse(error: Exception) -> AsyncIterator[ChatChunk]:
    """A stream that fails with ``error`` when first read."""
    raise error
    yield  # an async generator, so the error reaches the reader, not the caller
