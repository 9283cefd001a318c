"""The echo backend: a declared TEST DOUBLE, never a model.

It lets the core's tests (and plugin authors) exercise the server without weights: chat
echoes the last user message back word by word, a text completion echoes its prompt,
embeddings are a hash of the text, images are flat colours, rerank scores are the share
of the query's words a document contains, and a "transcript" has one segment per second
of audio ("Second 1." ...), in the request's prompt's words when it has a prompt.
``options["delay"]`` in its manifest slows each token, image or segment so tests can
exercise queues, cancellation and disconnects. None of this is a model: real rerankers
and speech models are tested with real weights in their plugins. It declares no
capabilities (``Backend.capabilities``): log-probabilities, a logit bias and thinking
switches are refused with a 400, and fill-in-the-middle too.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Iterator

from nexa.backend import Backend, CancelToken
from nexa.errors import BadRequest, ContextLengthExceeded, ModelLoadError
from nexa.types import (
    BackendMetric,
    ChatChunk,
    ChatRequest,
    CompletionRequest,
    ContextPlan,
    EmbedRequest,
    EmbedResult,
    ImageRequest,
    ImageResult,
    Manifest,
    RerankRequest,
    RerankResult,
    Task,
    ToolCall,
    TranscribeRequest,
    TranscriptChunk,
    TranscriptSegment,
    Usage,
    Word,
)

ECHO_FORMAT = "echo"
ECHO_DIMENSIONS = 16
ECHO_TASKS = frozenset({Task.CHAT, Task.VLM, Task.EMBED, Task.IMAGE, Task.RERANK, Task.TRANSCRIBE})


def echo_manifest(name: str = "test/echo", **options: object) -> Manifest:
    """A manifest for the echo backend (no files)."""
    return Manifest(
        name=name,
        format=ECHO_FORMAT,
        tasks=ECHO_TASKS,
        source="package:nexa-core (test double)",
        context_length=int(options.pop("context_length", 256)),  # type: ignore[call-overload]
        options=options,
    )


class EchoBackend(Backend):
    """Test double: answers with the words it was sent."""

    name = "echo"
    tasks = ECHO_TASKS
    formats = frozenset({ECHO_FORMAT})
    devices = frozenset({"cpu", "cuda", "metal"})
    parallel = 2
    chats_started = 0

    def load(self) -> None:
        if self.manifest.options.get("fail_load"):
            raise ModelLoadError(f"echo model {self.manifest.name!r} was told to fail loading")
        time.sleep(float(self.manifest.options.get("load_delay", 0.0)))  # type: ignore[arg-type]
        self.loads = getattr(self, "loads", 0) + 1

    def runtime_metrics(self) -> list[BackendMetric]:
        # Shows how a backend reports its own figures; tests read them back from /metrics.
        return [BackendMetric("echo_chats_started", self.chats_started, "counter", "Chats the echo double began")]

    def context_plan(self) -> ContextPlan:
        # The context chat checks prompts against, and why, as a real backend says it.
        if self.options.context_length:
            return ContextPlan(self.options.context_length, "set by --ctx")
        return ContextPlan(self.manifest.context_length or 256, "the echo model's manifest")

    def count_prompt_tokens(self, request: ChatRequest) -> int:
        # One word or image is one token, as ``chat`` counts them (no template, no tools).
        return sum(len(m.text.split()) + len(m.images) for m in request.messages)

    def chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        self.chats_started += 1
        delay = float(self.manifest.options.get("delay", 0.0))  # type: ignore[arg-type]
        last_user = next((m for m in reversed(request.messages) if m.role == "user"), None)
        text = last_user.text if last_user else ""
        words = text.split()
        prompt_tokens = self.count_prompt_tokens(request)
        context = self.context_plan().length
        if prompt_tokens > context:
            raise ContextLengthExceeded(
                f"the prompt is {prompt_tokens} tokens; the context is {context}", param="messages"
            )
        if request.tools and request.tool_choice not in (None, "none", "auto"):
            tool = request.tools[0]["function"]["name"]
            if isinstance(request.tool_choice, dict):
                tool = request.tool_choice["function"]["name"]
            call = ToolCall(id="call_echo0", name=tool, arguments=json.dumps({"text": " ".join(words)}))
            yield ChatChunk(tool_calls=(call,), finish_reason="tool_calls",
                            usage=Usage(prompt_tokens, 1))
            return
        images = sum(len(m.images) for m in request.messages)
        if images:
            words = [f"[{images} image(s)]"] + words
        max_tokens = request.sampling.max_tokens
        limit = max_tokens if max_tokens is not None else len(words)
        produced = 0
        for i, word in enumerate(words[:limit]):
            cancel.raise_if_cancelled()
            if delay:
                time.sleep(delay)
            produced += 1
            # One word is one token; stop strings are cut by the server (not stops_natively).
            yield ChatChunk(content=word if i == 0 else " " + word)
        finish = "length" if len(words) > limit else "stop"
        yield ChatChunk(finish_reason=finish, usage=Usage(prompt_tokens, produced))

    def complete(self, request: CompletionRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        if request.suffix is not None:
            raise BadRequest("the echo double has no fill-in-the-middle tokens", param="suffix")
        prompt = request.prompt
        words = prompt.split() if isinstance(prompt, str) else [str(t) for t in prompt]
        limit = request.sampling.max_tokens if request.sampling.max_tokens is not None else len(words)
        for i, word in enumerate(words[:limit]):
            cancel.raise_if_cancelled()
            yield ChatChunk(content=word if i == 0 else " " + word)
        finish = "length" if len(words) > limit else "stop"
        yield ChatChunk(finish_reason=finish, usage=Usage(len(words), min(limit, len(words))))

    def embed(self, request: EmbedRequest, cancel: CancelToken) -> EmbedResult:
        vectors = []
        tokens = 0
        for item in request.inputs:
            cancel.raise_if_cancelled()
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += len(text.split()) if isinstance(item, str) else len(item)
            digest = hashlib.sha256(text.encode()).digest()
            raw = [b - 127.5 for b in digest[:ECHO_DIMENSIONS]]
            norm = math.sqrt(sum(v * v for v in raw)) or 1.0
            vectors.append(tuple(v / norm for v in raw))
        return EmbedResult(tuple(vectors), tokens)

    def generate_images(self, request: ImageRequest, cancel: CancelToken) -> ImageResult:
        from PIL import Image

        delay = float(self.manifest.options.get("delay", 0.0))  # type: ignore[arg-type]
        images = []
        for i in range(request.n):
            cancel.raise_if_cancelled()
            if delay:
                time.sleep(delay)
            seed = f"{request.prompt}|{request.seed}|{i}"
            colour = tuple(hashlib.sha256(seed.encode()).digest()[:3])
            out = io.BytesIO()
            Image.new("RGB", (request.width or 512, request.height or 512), colour).save(out, format="PNG")
            images.append(out.getvalue())
        return ImageResult(tuple(images), request.seed)

    def rerank(self, request: RerankRequest, cancel: CancelToken) -> RerankResult:
        query = set(request.query.lower().split())
        scores = []
        tokens = 0
        for document in request.documents:
            cancel.raise_if_cancelled()
            words = set(document.lower().split())
            tokens += len(request.query.split()) + len(document.split())
            scores.append(len(query & words) / len(query) if query else 0.0)
        return RerankResult(tuple(scores), tokens)

    def transcribe(self, request: TranscribeRequest, cancel: CancelToken) -> Iterator[TranscriptChunk]:
        delay = float(self.manifest.options.get("delay", 0.0))  # type: ignore[arg-type]
        duration = request.audio.duration
        prompt = (request.prompt or "").split()
        count = math.ceil(duration)
        for i in range(count):
            cancel.raise_if_cancelled()
            if delay:
                time.sleep(delay)
            start, end = float(i), min(float(i + 1), duration)
            text = prompt[i] if i < len(prompt) else f"Second {i + 1}."
            words = ()
            if request.word_timestamps:
                parts = text.split()
                step = (end - start) / len(parts)
                words = tuple(Word(" " + w, start + k * step, start + (k + 1) * step) for k, w in enumerate(parts))
            yield TranscriptChunk(segment=TranscriptSegment(
                id=i, start=start, end=end, text=" " + text, words=words, seek=i * 100))
        yield TranscriptChunk(done=True, language=request.language or "en")
