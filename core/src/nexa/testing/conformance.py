"""Conformance checks every backend of a task must pass (used by plugin test suites).

Each function takes a backend instance that is already ``start()``-ed, runs the async
interface the server uses, and raises AssertionError with a clear message on a breach.
What they check is listed in ``docs/plugin-guide.md``:

chat (``check_chat``)
  - the answer streams as chunks; only the last has a ``finish_reason``
    (``stop``/``length``/``tool_calls``) and it carries ``usage``;
  - temperature 0 with a seed gives the same text twice;
  - ``max_tokens`` bounds the text itself, not only the reported usage: the answer to
    ``max_tokens=1`` starts the answer to ``max_tokens=8``, and differs from it unless the
    model stopped at once; an answer cut by the limit reports exactly that many tokens;
  - usage is honest: a longer prompt reports more prompt tokens, a non-empty answer at
    least one completion token; ``count_prompt_tokens``, where a backend has it, gives
    the prompt tokens its answer reports;
  - stop strings end the answer before their first occurrence, with ``finish_reason``
    ``stop`` (checked through ``Backend.stream_answer``, so a backend that declares
    ``stops_natively`` must really stop; others are cut by the server);
  - cancellation: closing a stream stops the work promptly; a backend with a synchronous
    ``chat`` must check its ``CancelToken`` (given an already cancelled token it may
    yield at most one chunk before stopping).

embed (``check_embed``): one L2-normalised vector per input, one dimension, the same text
embeds the same, tokens counted, a cancelled token stops the work.

images (``check_images``): ``n`` PNGs of the requested size, reproducible with a seed, a
cancelled token stops the work.

rerank (``check_rerank``): one finite score per document, in document order; a
document's score does not depend on the others in the batch or their order (batching
and padding change nothing); the same document twice scores the same; more documents
count more tokens; a cancelled token stops the work. With ``relevance=True`` (real
models) the document that answers the query outranks unrelated ones.

transcribe (``check_transcribe``): segments stream as chunks and only the last chunk has
``done`` and a language; segment ids count up, times lie within the audio and never go
backwards; ``word_timestamps`` gives words within their segment's times; translation
works or is refused with ``UnsupportedTask``; closing the stream stops the work, and a
synchronous ``transcribe`` checks its ``CancelToken``. ``expected_words`` (real speech,
real models) must all be heard.
"""

from __future__ import annotations

import asyncio
import io
import math
import struct
import time

import attrs

from nexa.backend import Backend, CancelToken
from nexa.errors import Cancelled, UnsupportedTask
from nexa.types import (
    SAMPLE_RATE,
    Audio,
    ChatMessage,
    ChatRequest,
    EmbedRequest,
    ImageRequest,
    RerankRequest,
    Sampling,
    TranscribeRequest,
    TranscriptChunk,
)

PROMPT = "Say hello in three words."


def _run(coro):  # noqa: ANN001, ANN202
    return asyncio.run(coro)


def _request(prompt: str, **sampling: object) -> ChatRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("seed", 1)
    return ChatRequest(messages=[ChatMessage("user", prompt)], sampling=Sampling(**sampling))  # type: ignore[arg-type]


async def _answer(backend: Backend, request: ChatRequest):  # noqa: ANN202
    chunks = [c async for c in backend.stream_answer(request)]
    assert chunks, "stream_chat yielded nothing"
    last = chunks[-1]
    assert last.finish_reason in {"stop", "length", "tool_calls"}, f"bad finish_reason {last.finish_reason!r}"
    assert all(c.finish_reason is None for c in chunks[:-1]), "finish_reason before the last chunk"
    assert last.usage is not None, "the last chunk lacks usage"
    return "".join(c.content for c in chunks), last.finish_reason, last.usage


async def _on_worker(backend: Backend, fn, *args):  # noqa: ANN001, ANN202
    """Run ``fn`` on the model's own worker thread, as the server runs synchronous methods."""
    return await asyncio.get_running_loop().run_in_executor(backend._executor, fn, *args)


def _overrides_async_chat(backend: Backend) -> bool:
    return type(backend).stream_chat is not Backend.stream_chat


async def check_chat_async(backend: Backend, prompt: str = PROMPT) -> None:
    started = time.monotonic()
    text, finish, usage = await _answer(backend, _request(prompt, max_tokens=8))
    # What one token costs this backend on this machine, however busy it is now.
    per_token = (time.monotonic() - started) / max(1, usage.completion_tokens)
    assert usage.prompt_tokens > 0, "usage.prompt_tokens must count the prompt"
    assert usage.completion_tokens <= 8, "max_tokens not honoured in usage"
    assert text, "a chat backend must answer this prompt with some text at temperature 0"
    assert usage.completion_tokens >= 1, "a non-empty answer reports at least one completion token"
    if finish == "length":
        assert usage.completion_tokens == 8, "an answer cut by max_tokens=8 must report 8 completion tokens"
    again, _, _ = await _answer(backend, _request(prompt, max_tokens=8))
    assert again == text, "temperature 0 with a seed is not reproducible"

    # max_tokens bounds the text itself.
    one, finish_one, usage_one = await _answer(backend, _request(prompt, max_tokens=1))
    assert usage_one.completion_tokens <= 1, "max_tokens=1 reported more than one completion token"
    assert text.startswith(one), "the answer to max_tokens=1 must start the answer to max_tokens=8 (greedy)"
    if finish_one == "length" and finish == "length":
        assert one != text, "max_tokens=1 gave the same text as max_tokens=8: max_tokens is ignored"

    # Usage is counted, not made up: more prompt, more prompt tokens.
    longer = prompt + " Answer politely, and think about the words you choose before you write them down."
    _, _, usage_long = await _answer(backend, _request(longer, max_tokens=1))
    assert usage_long.prompt_tokens > usage_one.prompt_tokens, "a longer prompt must report more prompt tokens"

    # A backend that counts prompts (count_tokens) counts what chat reports.
    if type(backend).count_prompt_tokens is not Backend.count_prompt_tokens:
        counted = await backend.run_count_prompt_tokens(_request(longer, max_tokens=1))
        assert counted == usage_long.prompt_tokens, (
            f"count_prompt_tokens gave {counted}, chat reported {usage_long.prompt_tokens} prompt tokens")

    # Stop strings: the answer ends before the first occurrence.
    stop = _stop_string(text)
    if stop is not None:
        cut, finish_stop, _ = await _answer(backend, _request(prompt, max_tokens=8, stop=(stop,)))
        expected = text[: text.index(stop)]
        assert cut == expected, f"stop {stop!r}: expected {expected!r}, got {cut!r}"
        assert finish_stop == "stop", "an answer ended by a stop string must finish with 'stop'"

    # Closing the stream early must stop the work and free the worker promptly: within
    # the time of a few hundred tokens, far from the 2000 it was asked for (the limit
    # scales with the backend's own speed, so a busy machine does not fail it).
    stream = backend.stream_answer(_request(prompt, max_tokens=2000))
    await anext(stream)
    started = time.monotonic()
    await stream.aclose()
    took = time.monotonic() - started
    assert took < max(10.0, 200 * per_token), f"closing a stream took {took:.1f} s: generation did not stop"
    if not _overrides_async_chat(backend):
        await _on_worker(backend, _check_sync_chat_cancel, backend, prompt)


def _stop_string(text: str) -> str | None:
    """Two characters from inside ``text`` that first occur after its start, or None."""
    for i in range(1, len(text) - 1):
        candidate = text[i : i + 2]
        if candidate.strip() and text.index(candidate) == i:
            return candidate
    return None


def _check_sync_chat_cancel(backend: Backend, prompt: str) -> None:
    token = CancelToken()
    token.cancel()
    produced = 0
    try:
        for chunk in backend.chat(_request(prompt, max_tokens=64), token):
            if chunk.content or chunk.tool_calls:
                produced += 1
            assert produced <= 1, "chat() went on generating with a cancelled CancelToken (check it every token)"
    except Cancelled:
        pass


def _check_sync_cancel(method, request) -> None:  # noqa: ANN001
    token = CancelToken()
    token.cancel()
    try:
        method(request, token)
    except Cancelled:
        return
    raise AssertionError(f"{method.__name__}() ran to the end with a cancelled CancelToken (check it between units of work)")


async def check_embed_async(backend: Backend) -> None:
    texts = ["the cat sat on the mat", "quantum chromodynamics", "the cat sat on the mat"]
    result = await backend.run_embed(EmbedRequest(inputs=texts))
    assert len(result.vectors) == len(texts), "one vector per input"
    dims = {len(v) for v in result.vectors}
    assert len(dims) == 1 and dims.pop() > 0, "vectors must share one positive dimension"
    for v in result.vectors:
        assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3, "vectors must be L2-normalised"
    same = sum(a * b for a, b in zip(result.vectors[0], result.vectors[2], strict=True))
    assert same > 0.999, "the same text must embed the same"
    assert result.prompt_tokens > 0, "prompt_tokens must be counted"
    if type(backend).run_embed is Backend.run_embed:
        await _on_worker(backend, _check_sync_cancel, backend.embed, EmbedRequest(inputs=texts))


async def check_images_async(backend: Backend, size: int = 64) -> None:
    from PIL import Image

    request = ImageRequest(prompt="a red square", n=2, width=size, height=size, seed=7, steps=2)
    result = await backend.run_images(request)
    assert len(result.images) == 2, "n images expected"
    for png in result.images:
        assert png[:8] == b"\x89PNG\r\n\x1a\n", "images must be PNG"
        with Image.open(io.BytesIO(png)) as img:
            assert img.size == (size, size), f"wrong size {img.size}"
    again = await backend.run_images(request)
    assert again.images == result.images, "same seed must give the same images"
    if type(backend).run_images is Backend.run_images:
        await _on_worker(backend, _check_sync_cancel, backend.generate_images, request)


RERANK_QUERY = "What is the capital city of France?"
RERANK_DOCUMENTS = (
    "Bananas are a good source of potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market closed higher on Tuesday.",
    "Photosynthesis turns light into chemical energy in plants.",
)
RELEVANT = 1
"""The index of the document in ``RERANK_DOCUMENTS`` that answers ``RERANK_QUERY``."""


async def check_rerank_async(backend: Backend, relevance: bool = False) -> None:
    documents = RERANK_DOCUMENTS
    result = await backend.run_rerank(RerankRequest(RERANK_QUERY, documents))
    scores = result.scores
    assert len(scores) == len(documents), "one score per document"
    assert all(isinstance(x, float) and math.isfinite(x) for x in scores), f"scores must be finite floats: {scores}"
    assert result.prompt_tokens > 0, "prompt_tokens must be counted"
    # The same scores whatever else is in the batch, and in whatever order.
    alone = await backend.run_rerank(RerankRequest(RERANK_QUERY, documents[RELEVANT:RELEVANT + 1]))
    assert abs(alone.scores[0] - scores[RELEVANT]) < 1e-3, (
        f"a document scored {alone.scores[0]} alone but {scores[RELEVANT]} in a batch: batching changes scores")
    reordered = await backend.run_rerank(RerankRequest(RERANK_QUERY, documents[::-1] + documents[:1]))
    assert all(abs(a - b) < 1e-3 for a, b in zip(reordered.scores[:-1], scores[::-1], strict=True)), (
        "scores must follow their documents when the order changes")
    assert abs(reordered.scores[-1] - scores[0]) < 1e-3, "the same document twice must score the same"
    assert reordered.prompt_tokens > result.prompt_tokens, "more documents must count more tokens"
    assert alone.prompt_tokens < result.prompt_tokens, "fewer documents must count fewer tokens"
    if relevance:
        best = max(range(len(scores)), key=lambda i: scores[i])
        assert best == RELEVANT, f"the answering document must rank first: scores {scores}"
    if type(backend).run_rerank is Backend.run_rerank:
        await _on_worker(backend, _check_sync_cancel, backend.rerank, RerankRequest(RERANK_QUERY, documents))


def tone(seconds: float = 3.0, hz: float = 440.0) -> Audio:
    """A sine tone, for backends checked without recorded speech."""
    count = int(seconds * SAMPLE_RATE)
    samples = [0.3 * math.sin(2 * math.pi * hz * i / SAMPLE_RATE) for i in range(count)]
    return Audio(struct.pack(f"<{count}f", *samples))


async def _transcript(backend: Backend, request: TranscribeRequest) -> list[TranscriptChunk]:
    chunks = [c async for c in backend.stream_transcribe(request)]
    assert chunks, "stream_transcribe yielded nothing"
    assert chunks[-1].done, "the last chunk must have done=True"
    assert all(not c.done for c in chunks[:-1]), "done before the last chunk"
    assert chunks[-1].language, "the last chunk must name the language"
    duration = request.audio.duration
    segments = [c.segment for c in chunks if c.segment is not None]
    for before, after in zip(segments, segments[1:], strict=False):
        assert after.id > before.id, "segment ids must count up"
        assert after.start >= before.start - 1e-3, "segments must not go backwards in time"
    for segment in segments:
        assert 0 <= segment.start <= segment.end <= duration + 0.5, (
            f"segment times {segment.start}..{segment.end} outside the audio's {duration:.2f} s")
        for word in segment.words:
            assert segment.start - 0.5 <= word.start <= word.end <= segment.end + 0.5, (
                f"word {word.word!r} at {word.start}..{word.end} outside its segment")
    return chunks


async def check_transcribe_async(
    backend: Backend, audio: Audio | None = None, expected_words: tuple[str, ...] = (), language: str | None = None
) -> None:
    audio = audio or tone()
    request = TranscribeRequest(audio=audio, language=language)
    chunks = await _transcript(backend, request)
    text = "".join(c.segment.text for c in chunks if c.segment is not None).lower()
    missing = [w for w in expected_words if w.lower() not in text]
    assert not missing, f"words not heard: {missing} in {text!r}"
    worded = await _transcript(backend, attrs.evolve(request, word_timestamps=True))
    if expected_words:
        assert any(c.segment is not None and c.segment.words for c in worded), "word_timestamps gave no words"
    try:
        await _transcript(backend, attrs.evolve(request, translate=True))
    except UnsupportedTask:
        pass
    # Closing the stream early must stop the work and free the worker promptly.
    long = Audio(audio.samples * 4, audio.sample_rate)
    stream = backend.stream_transcribe(TranscribeRequest(audio=long, language=language))
    await anext(stream)
    started = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - started < 30, "closing a stream did not stop the transcription"
    if type(backend).stream_transcribe is Backend.stream_transcribe:
        await _on_worker(backend, _check_sync_transcribe_cancel, backend, request)


def _check_sync_transcribe_cancel(backend: Backend, request: TranscribeRequest) -> None:
    token = CancelToken()
    token.cancel()
    produced = 0
    try:
        for chunk in backend.transcribe(request, token):
            produced += chunk.segment is not None
            assert produced <= 1, "transcribe() went on with a cancelled CancelToken (check it between windows)"
    except Cancelled:
        pass


def check_rerank(backend: Backend, relevance: bool = False) -> None:
    _run(check_rerank_async(backend, relevance))


def check_transcribe(
    backend: Backend, audio: Audio | None = None, expected_words: tuple[str, ...] = (), language: str | None = None
) -> None:
    _run(check_transcribe_async(backend, audio, expected_words, language))


def check_chat(backend: Backend) -> None:
    _run(check_chat_async(backend))


def check_embed(backend: Backend) -> None:
    _run(check_embed_async(backend))


def check_images(backend: Backend) -> None:
    _run(check_images_async(backend))
