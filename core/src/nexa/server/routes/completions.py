"""``POST /v1/completions``: legacy text completion (code editors' fill-in-the-middle).

The body becomes one ``CompletionRequest`` per prompt (``convert.completion_requests``),
answered in turn on one model slot by ``Backend.stream_completion_answer``; a backend
without ``complete`` answers 400 ``model_not_supported``. Streamed as ``text_completion``
events, one choice index per prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from litestar import Controller, Request, post
from litestar.params import JSONBody

from nexa.backend import Backend
from nexa.errors import NexaError
from nexa.manager import Lease
from nexa.metrics import Metrics
from nexa.server import convert
from nexa.server import schemas as wire
from nexa.server.deps import Config, Manager, MetricsDep
from nexa.server.errors import INFERENCE, error_payload, error_responses
from nexa.server.openapi import StreamingOperation
from nexa.server.routes.chat import record_generation, usage_wire
from nexa.server.work import SSE_DONE, SSE_HEADERS, EventStream, sse, until_disconnected
from nexa.types import ChatChunk, CompletionRequest, Task, TokenLogprob, Usage


class _Logprobs:
    """The legacy ``logprobs`` object of one choice, built token by token."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.value = wire.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])

    def add(self, records: tuple[TokenLogprob, ...]) -> None:
        for record in records:
            self.value.tokens.append(record.token)
            self.value.token_logprobs.append(record.logprob)
            self.value.top_logprobs.append(dict(record.top))
            self.value.text_offset.append(self.offset)
            self.offset += len(record.token)


def _add_usage(total: Usage, usage: Usage | None) -> Usage:
    if usage is None:
        return total
    return Usage(total.prompt_tokens + usage.prompt_tokens, total.completion_tokens + usage.completion_tokens)


class CompletionsController(Controller):
    path = "/v1/completions"
    tags = ["completions"]

    @post(status_code=200, summary="Create a text completion (legacy; fill-in-the-middle with suffix)",
          responses=error_responses(*INFERENCE), operation_class=StreamingOperation)
    async def create(
        self,
        data: JSONBody[wire.CompletionRequest],
        request: Request,
        manager: Manager,
        config: Config,
        metrics: MetricsDep,
    ) -> wire.TextCompletion | EventStream:
        tasks = convert.completion_requests(data, config)
        lease = manager.acquire(data.model, Task.CHAT, keep_alive=convert.keep_alive_seconds(data.keep_alive))
        stack: contextlib.AsyncExitStack | None = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            backend = await until_disconnected(request, stack.enter_async_context(lease))
            completion = _Completion(data, backend, metrics, lease)
            if data.stream:
                frames = completion.frames(tasks)
                stack.push_async_callback(frames.aclose)
                # The first frame is awaited here so that errors before any output (an
                # unsupported model, context overflow) are real HTTP errors.
                first = await until_disconnected(request, anext(frames))
                body = completion.stream(first, frames, stack, config.request_timeout)
                stack = None  # the stream owns it now
                return EventStream(body, headers=SSE_HEADERS)
            return await until_disconnected(request, asyncio.wait_for(completion.whole(tasks), config.request_timeout))
        except asyncio.CancelledError:
            # The model was unloaded under this request (mode cancel): say so to the client.
            error = lease.take_revocation()
            if error is not None:
                raise error from None
            raise
        finally:
            if stack is not None:
                await stack.aclose()


class _Completion:
    def __init__(self, body: wire.CompletionRequest, backend: Backend, metrics: Metrics, lease: Lease) -> None:
        self.body = body
        self.lease = lease
        self.backend = backend
        self.metrics = metrics
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.usage = Usage()

    def _echo(self, task: CompletionRequest) -> str:
        return task.prompt if self.body.echo and isinstance(task.prompt, str) else ""

    async def _chunks(self, task: CompletionRequest) -> AsyncIterator[ChatChunk]:
        started = time.monotonic()
        first_at = None
        usage = None
        chunks = self.backend.stream_completion_answer(task)
        try:
            async for chunk in chunks:
                if first_at is None and chunk.content:
                    first_at = time.monotonic()
                usage = chunk.usage or usage
                yield chunk
        finally:
            await chunks.aclose()
        record_generation(self.metrics, self.body.model, usage, started, first_at)
        self.usage = _add_usage(self.usage, usage)

    async def whole(self, tasks: list[CompletionRequest]) -> wire.TextCompletion:
        choices = []
        for index, task in enumerate(tasks):
            echo = self._echo(task)
            text = [echo]
            logprobs = _Logprobs(0) if task.logprobs is not None else None
            finish = "stop"
            async for chunk in self._chunks(task):
                text.append(chunk.content)
                if logprobs is not None:
                    logprobs.add(chunk.logprobs)
                finish = chunk.finish_reason or finish
            choices.append(wire.CompletionChoice(index=index, text="".join(text), finish_reason=finish,
                                                 logprobs=logprobs.value if logprobs is not None else None))
        return wire.TextCompletion(id=self.id, created=self.created, model=self.body.model, choices=choices,
                                   usage=usage_wire(self.usage))

    def _event(self, index: int, text: str, finish: str | None, logprobs: _Logprobs | None) -> bytes:
        choice = wire.CompletionChoice(index=index, text=text, finish_reason=finish,
                                       logprobs=logprobs.value if logprobs is not None else None)
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        return sse(wire.TextCompletion(id=self.id, created=self.created, model=self.body.model, choices=[choice],
                                       usage=None if include_usage else msgspec.UNSET))

    async def frames(self, tasks: list[CompletionRequest]) -> AsyncIterator[bytes]:
        """The events of every choice, then the usage event (when asked for) and [DONE]."""
        for index, task in enumerate(tasks):
            echo = self._echo(task)  # sent with the first piece, once the backend has started
            offset = 0
            async for chunk in self._chunks(task):
                logprobs = None
                if task.logprobs is not None:
                    logprobs = _Logprobs(offset)
                    logprobs.add(chunk.logprobs)
                    offset = logprobs.offset
                if echo or chunk.content or chunk.finish_reason or chunk.logprobs:
                    yield self._event(index, echo + chunk.content, chunk.finish_reason, logprobs)
                    echo = ""
        tail = []
        if self.body.stream_options and self.body.stream_options.include_usage:
            tail.append(sse(wire.TextCompletion(id=self.id, created=self.created, model=self.body.model,
                                                choices=[], usage=usage_wire(self.usage))))
        tail.append(SSE_DONE)
        yield b"".join(tail)

    async def stream(self, first: bytes, frames: AsyncIterator[bytes], stack: contextlib.AsyncExitStack,
                     timeout: float) -> AsyncIterator[bytes]:
        self.lease.adopt()  # this body runs in the response's own task: an unload cancels it
        try:
            yield first
            async with asyncio.timeout(timeout):
                async for frame in frames:
                    yield frame
        except asyncio.CancelledError:
            unloaded = self.lease.take_revocation()
            if unloaded is None:
                raise
            yield sse(error_payload(unloaded))
        except (NexaError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                exc = NexaError("the request ran past the server's request timeout", code="timeout")
            yield sse(error_payload(exc))
        except Exception as exc:
            yield sse(error_payload(NexaError(f"internal error ({type(exc).__name__})")))
        finally:
            await stack.aclose()


__all__ = ["CompletionsController"]
