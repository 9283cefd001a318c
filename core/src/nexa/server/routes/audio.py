"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: speech to text.

OpenAI's shape: a ``multipart/form-data`` upload (these are the server's only routes
that take multipart rather than JSON), answered as json, text, srt, vtt or
verbose_json, or with ``stream: true`` as ``transcript.text.delta`` events and a last
``transcript.text.done``. The file is decoded and checked here (``nexa.audio``, off the
event loop) after the model is known to transcribe, and a model slot's
``Backend.stream_transcribe`` turns it into segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, Response, post
from litestar.enums import RequestEncodingType
from litestar.params import Body

from nexa.audio import decode_audio
from nexa.config import ServerConfig
from nexa.errors import BadRequest, NexaError, PayloadTooLarge
from nexa.server import schemas as wire
from nexa.server import transcripts
from nexa.server.deps import Config, Manager
from nexa.server.errors import INFERENCE, error_payload, error_responses
from nexa.server.openapi import TranscriptionOperation
from nexa.server.work import SSE_DONE, SSE_HEADERS, EventStream, run_on_model, sse, until_disconnected
from nexa.types import Task, TranscribeRequest, Transcript, TranscriptChunk

log = logging.getLogger("nexa.server")

MULTIPART = RequestEncodingType.MULTI_PART
"""The request body of both routes: a multipart form with the audio file."""
ACCEPTS = {"request_content_types": ("multipart/form-data",)}
"""Handler ``opt``: the content types these routes take (a guard checking content types reads it)."""
TEXT_FORMATS = {"text": "text/plain; charset=utf-8", "srt": "text/plain; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}


def _granularities(form: wire.TranscriptionForm) -> set[str]:
    found: set[str] = set()
    for value in (form.timestamp_granularities, form.timestamp_granularities_list):
        if value is not None:
            found.update([value] if isinstance(value, str) else value)
    return found


def _check_format(response_format: str, stream: bool) -> None:
    if stream and response_format not in ("json", "text"):
        raise BadRequest(f"stream is only available with response_format json or text, not {response_format}",
                         param="stream")


async def _audio(upload: Any, config: ServerConfig) -> bytes:
    data = await upload.read()
    if len(data) > config.max_audio_bytes:
        raise PayloadTooLarge(
            f"file is {len(data)} bytes; this server takes audio files of at most {config.max_audio_bytes} bytes",
            param="file",
        )
    if not data:
        raise BadRequest("file is empty", param="file")
    return data


class AudioController(Controller):
    path = "/v1/audio"
    tags = ["audio"]

    @post("/transcriptions", status_code=200, summary="Transcribe speech (multipart upload)", opt=ACCEPTS,
          responses=error_responses(*INFERENCE), operation_class=TranscriptionOperation)
    async def transcriptions(
        self,
        data: Annotated[wire.TranscriptionForm, Body(media_type=MULTIPART)],
        request: Request,
        manager: Manager,
        config: Config,
    ) -> wire.TranscriptionVerbose | wire.Transcription | Response[str] | EventStream:
        _check_format(data.response_format, data.stream)
        granularities = _granularities(data)
        if granularities and data.response_format != "verbose_json":
            raise BadRequest("timestamp_granularities needs response_format verbose_json",
                             param="timestamp_granularities")
        job = Job(data, translate=False, segments="segment" in granularities or not granularities,
                  words="word" in granularities)
        return await job.run(request, manager, config)

    @post("/translations", status_code=200, summary="Translate speech into English text (multipart upload)",
          opt=ACCEPTS, responses=error_responses(*INFERENCE), operation_class=TranscriptionOperation)
    async def translations(
        self,
        data: Annotated[wire.TranslationForm, Body(media_type=MULTIPART)],
        request: Request,
        manager: Manager,
        config: Config,
    ) -> wire.TranscriptionVerbose | wire.Transcription | Response[str] | EventStream:
        _check_format(data.response_format, data.stream)
        return await Job(data, translate=True, segments=True, words=False).run(request, manager, config)


class Job:
    """One transcription request: its form, what the answer holds, and how it is sent."""

    def __init__(self, form: wire.TranscriptionForm | wire.TranslationForm, *, translate: bool, segments: bool,
                 words: bool) -> None:
        self.form = form
        self.translate = translate
        self.segments = segments
        self.words = words

    async def run(self, request: Request, manager: Manager, config: Config) -> Any:
        form = self.form
        # The model first: a file for an unknown model, or one that does not transcribe,
        # is refused before it is decoded.
        manager.resolve(form.model, Task.TRANSCRIBE)
        data = await _audio(form.file, config)
        audio = await asyncio.to_thread(decode_audio, data, max_seconds=config.max_audio_seconds)
        spec = TranscribeRequest(
            audio=audio, language=form.language.lower() if form.language else None, prompt=form.prompt,
            temperature=form.temperature or 0.0, translate=self.translate, word_timestamps=self.words,
            model=form.model,
        )
        if not form.stream:
            transcript = await run_on_model(
                request, manager, config, form.model, Task.TRANSCRIBE, lambda backend: backend.run_transcribe(spec)
            )
            return self.render(transcript)
        stack: contextlib.AsyncExitStack | None = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            backend = await until_disconnected(
                request, stack.enter_async_context(manager.acquire(form.model, Task.TRANSCRIBE)))
            chunks = backend.stream_transcribe(spec)
            stack.push_async_callback(chunks.aclose)
            # Errors before the first segment (a language the model lacks) are HTTP errors.
            first = await until_disconnected(request, anext(chunks, None))
            body = self.frames(chunks, first, stack, spec, config.request_timeout)
            stack = None  # the stream owns it now
            return EventStream(body, headers=SSE_HEADERS)
        finally:
            if stack is not None:
                await stack.aclose()

    def render(self, transcript: Transcript) -> Any:
        fmt = self.form.response_format
        if fmt == "json":
            return wire.Transcription(text=transcript.text, usage=transcripts.usage(transcript))
        if fmt == "verbose_json":
            return transcripts.verbose(transcript, translate=self.translate, segments=self.segments, words=self.words)
        if fmt == "text":
            body = transcript.text + "\n"
        else:
            body = (transcripts.srt if fmt == "srt" else transcripts.vtt)(transcript.segments)
        return Response(body, media_type=TEXT_FORMATS[fmt], status_code=200)

    async def frames(
        self,
        chunks: AsyncIterator[TranscriptChunk],
        first: TranscriptChunk | None,
        stack: contextlib.AsyncExitStack,
        spec: TranscribeRequest,
        timeout: float,
    ) -> AsyncIterator[bytes]:
        segments = []
        language = spec.language or ""
        try:

            async def pieces() -> AsyncIterator[TranscriptChunk]:
                if first is not None:
                    yield first
                async for chunk in chunks:
                    yield chunk

            async with asyncio.timeout(timeout):
                async for chunk in pieces():
                    if chunk.language:
                        language = chunk.language
                    if chunk.segment is None:
                        continue
                    # Whisper starts each segment with a space; the first delta has none.
                    delta = chunk.segment.text if segments else chunk.segment.text.lstrip()
                    segments.append(chunk.segment)
                    if delta:
                        yield sse(wire.TranscriptTextDelta(delta=delta))
            transcript = Transcript(tuple(segments), language, spec.audio.duration)
            yield sse(wire.TranscriptTextDone(text=transcript.text, usage=transcripts.usage(transcript))) + SSE_DONE
        except (NexaError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                exc = NexaError("the request ran past the server's request timeout", code="timeout")
            yield sse(error_payload(exc))
        except Exception as exc:
            log.exception("transcription stream failed")
            yield sse(error_payload(NexaError(f"internal error ({type(exc).__name__})")))
        finally:
            await stack.aclose()
