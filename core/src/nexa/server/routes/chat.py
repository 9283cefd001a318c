"""``POST /v1/chat/completions``: text and image+text chat, whole or streamed.

The body is validated against the wire schema, converted once to a ``ChatRequest``
(``nexa.server.convert``; images fetched off the event loop), and answered by a model
slot's ``Backend.stream_answer``. A plain answer is collected into one ``ChatCompletion``;
a stream becomes ``ChatCompletionChunk`` events, with errors after the first byte sent
as an error event, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from litestar import Controller, Request, post
from litestar.params import JSONBody

from nexa.errors import NexaError
from nexa.manager import Lease
from nexa.metrics import Metrics
from nexa.server import chat_options, convert
from nexa.server import schemas as wire
from nexa.server.deps import Config, Manager, MetricsDep
from nexa.server.errors import INFERENCE, error_payload, error_responses
from nexa.server.openapi import StreamingOperation
from nexa.server.work import SSE_DONE, SSE_HEADERS, EventStream, sse, until_disconnected
from nexa.types import ChatChunk, Task, TokenLogprob, Usage, merge_tool_calls

log = logging.getLogger("nexa.server")


def usage_wire(usage: Usage | None) -> wire.UsageWire:
    usage = usage or Usage()
    return wire.UsageWire(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        completion_tokens_details=wire.CompletionTokensDetails(reasoning_tokens=usage.reasoning_tokens),
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def _token_bytes(token: str, raw: bytes | None) -> list[int]:
    return list(raw if raw is not None else token.encode("utf-8"))


def logprobs_wire(records: list[TokenLogprob]) -> wire.ChoiceLogprobs:
    """OpenAI's ``logprobs`` object of a choice or a chunk."""
    return wire.ChoiceLogprobs(content=[
        wire.TokenLogprobWire(
            token=r.token, logprob=r.logprob, bytes=_token_bytes(r.token, r.bytes),
            top_logprobs=[wire.TopLogprob(token=t, logprob=lp, bytes=_token_bytes(t, None)) for t, lp in r.top],
        )
        for r in records
    ])


def record_generation(metrics: Metrics, model: str, usage: Usage | None, started: float, first_at: float | None) -> None:
    """Token counts, time to first token and decode speed of one answer, for ``/metrics``."""
    if usage is not None:
        metrics.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        metrics.generated_tokens.labels(model).inc(usage.completion_tokens)
    if first_at is not None:
        metrics.ttft.labels(model).observe(first_at - started)
        elapsed = time.monotonic() - first_at
        if usage is not None and usage.completion_tokens > 1 and elapsed > 0:
            metrics.tokens_per_second.labels(model).observe((usage.completion_tokens - 1) / elapsed)


class ChatController(Controller):
    path = "/v1/chat/completions"
    tags = ["chat"]

    @post(status_code=200, summary="Create a chat completion (text or image+text)",
          responses=error_responses(*INFERENCE), operation_class=StreamingOperation)
    async def create(
        self,
        data: JSONBody[wire.ChatCompletionRequest],
        request: Request,
        manager: Manager,
        config: Config,
        metrics: MetricsDep,
    ) -> wire.ChatCompletion | wire.ChatCompletionChunk | EventStream:
        if any(isinstance(m.content, list) for m in data.messages):
            chat = await asyncio.to_thread(convert.chat_request, data, config)
        else:
            chat = convert.chat_request(data, config)
        task = Task.VLM if chat.has_images else Task.CHAT
        lease = manager.acquire(data.model, task, keep_alive=convert.keep_alive_seconds(data.keep_alive))
        stack: contextlib.AsyncExitStack | None = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            backend = await until_disconnected(request, stack.enter_async_context(lease))
            chat_options.refuse_for_backend(data, backend.name, backend.capabilities)
            started = time.monotonic()
            chunks = backend.stream_answer(chat)
            stack.push_async_callback(chunks.aclose)
            if data.stream:
                # The first chunk is awaited here so that errors found before any output
                # (context overflow, bad template) are real HTTP errors, not stream events.
                first = await until_disconnected(request, anext(chunks, None))
                include_usage = bool(data.stream_options and data.stream_options.include_usage)
                stream = ChatStream(data.model, include_usage, config.request_timeout, metrics, lease,
                                    legacy_functions=data.functions is not None, logprobs=chat.logprobs is not None)
                body = stream.frames(chunks, first, stack, started)
                stack = None  # the stream owns it now
                return EventStream(body, headers=SSE_HEADERS)
            collected = _collect(metrics, data.model, chunks, started, legacy_functions=data.functions is not None,
                                 logprobs=chat.logprobs is not None)
            return await until_disconnected(request, asyncio.wait_for(collected, config.request_timeout))
        except asyncio.CancelledError:
            # The model was unloaded under this request (mode cancel): say so to the client.
            error = lease.take_revocation()
            if error is not None:
                raise error from None
            raise
        finally:
            if stack is not None:
                await stack.aclose()


async def _collect(metrics: Metrics, model: str, chunks: AsyncIterator[ChatChunk], started: float, *,
                   legacy_functions: bool, logprobs: bool) -> wire.ChatCompletion:
    text: list[str] = []
    thought: list[str] = []
    calls = []
    records: list[TokenLogprob] = []
    finish = "stop"
    usage = None
    first_at = None
    async for chunk in chunks:
        if first_at is None and (chunk.content or chunk.reasoning or chunk.tool_calls):
            first_at = time.monotonic()
        text.append(chunk.content)
        thought.append(chunk.reasoning)
        calls.extend(chunk.tool_calls)
        records.extend(chunk.logprobs)
        if chunk.finish_reason:
            finish = chunk.finish_reason
        if chunk.usage:
            usage = chunk.usage
    record_generation(metrics, model, usage, started, first_at)
    content = "".join(text)
    reasoning = "".join(thought)
    tool_calls = [
        wire.ToolCallWire(id=c.id, function=wire.FunctionCall(name=c.name, arguments=c.arguments))
        for c in merge_tool_calls(calls)
    ]
    message = wire.ChoiceMessage(
        # Empty content stays "" (not null) unless the answer is a call: a thought cut off
        # by max_tokens says so with finish_reason "length" beside its reasoning.
        content=content if content or not tool_calls else None,
        tool_calls=tool_calls or None,
    )
    if reasoning:
        message.reasoning_content = reasoning
    if legacy_functions and tool_calls:
        message.tool_calls = None
        message.function_call = tool_calls[0].function
        finish = "function_call" if finish == "tool_calls" else finish
    return wire.ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[
            wire.Choice(
                index=0,
                message=message,
                finish_reason=finish,
                logprobs=logprobs_wire(records) if logprobs else None,
            )
        ],
        usage=usage_wire(usage),
    )


class ChatStream:
    """The SSE frames of one streamed answer (``chat.completion.chunk`` events)."""

    def __init__(self, model: str, include_usage: bool, timeout: float, metrics: Metrics, lease: Lease, *,
                 legacy_functions: bool = False, logprobs: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.timeout = timeout
        self.metrics = metrics
        self.lease = lease
        self.legacy_functions = legacy_functions
        self.logprobs = logprobs
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._tool_index: dict[str, int] = {}

    def chunk(self, delta: wire.ChunkDelta, finish: str | None,
              records: tuple[TokenLogprob, ...] = ()) -> wire.ChatCompletionChunk:
        if self.legacy_functions and finish == "tool_calls":
            finish = "function_call"
        return wire.ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[wire.ChunkChoice(delta=delta, finish_reason=finish,
                                      logprobs=logprobs_wire(list(records)) if records else None)],
            usage=None if self.include_usage else msgspec.UNSET,
        )

    def delta(self, chunk: ChatChunk) -> wire.ChunkDelta | None:
        """The wire delta of one backend chunk; None when it carries no text or call."""
        if not chunk.content and not chunk.reasoning and not chunk.tool_calls and not chunk.logprobs:
            return None
        delta = wire.ChunkDelta()
        if chunk.content:
            delta.content = chunk.content
        if chunk.reasoning:
            delta.reasoning_content = chunk.reasoning
        if chunk.tool_calls:
            calls = []
            for call in chunk.tool_calls:
                index = self._tool_index.get(call.id)
                if index is None:
                    # A new call: its first piece names it.
                    index = self._tool_index[call.id] = len(self._tool_index)
                    piece = wire.ToolCallDelta(index=index, id=call.id, type="function",
                                               function=wire.FunctionCallDelta(name=call.name, arguments=call.arguments))
                else:
                    piece = wire.ToolCallDelta(index=index, function=wire.FunctionCallDelta(arguments=call.arguments))
                calls.append(piece)
            if self.legacy_functions:
                # The deprecated style streams one call: its name, then its arguments.
                first = [c for c in calls if c.index == 0]
                if first:
                    delta.function_call = wire.FunctionCallDeltaLegacy(
                        name=first[0].function.name, arguments=first[0].function.arguments)
            else:
                delta.tool_calls = calls
        return delta

    async def frames(
        self,
        chunks: AsyncIterator[ChatChunk],
        first: ChatChunk | None,
        stack: contextlib.AsyncExitStack,
        started: float,
    ) -> AsyncIterator[bytes]:
        self.lease.adopt()  # this body runs in the response's own task
        usage = None
        first_at = None
        # The role frame leaves in one write with the first piece of the answer (already
        # awaited before the response began): the client wakes once for both, not twice.
        head = sse(self.chunk(wire.ChunkDelta(role="assistant", content=""), None))
        try:

            async def pieces() -> AsyncIterator[ChatChunk]:
                if first is not None:
                    yield first
                async for chunk in chunks:
                    yield chunk

            async with asyncio.timeout(self.timeout):
                async for chunk in pieces():
                    delta = self.delta(chunk)
                    if first_at is None and delta is not None:
                        first_at = time.monotonic()
                    if chunk.usage:
                        usage = chunk.usage
                    if delta is not None or chunk.finish_reason:
                        records = chunk.logprobs if self.logprobs else ()
                        out = sse(self.chunk(delta or wire.ChunkDelta(), chunk.finish_reason, records))
                        if head:
                            out, head = head + out, b""
                        yield out
            tail = [head]
            head = b""
            if self.include_usage:
                tail.append(sse(wire.ChatCompletionChunk(
                    id=self.id, created=self.created, model=self.model, choices=[], usage=usage_wire(usage),
                )))
            tail.append(SSE_DONE)
            yield b"".join(tail)
            record_generation(self.metrics, self.model, usage, started, first_at)
        except asyncio.CancelledError:
            unloaded = self.lease.take_revocation()
            if unloaded is None:
                raise
            yield head + sse(error_payload(unloaded))
        except (NexaError, TimeoutError) as exc:
            # Headers are gone already: the error travels as a stream event, as OpenAI does.
            if isinstance(exc, TimeoutError):
                exc = NexaError("the request ran past the server's request timeout", code="timeout")
            yield head + sse(error_payload(exc))
        except Exception as exc:
            log.exception("chat stream failed")
            yield head + sse(error_payload(NexaError(f"internal error ({type(exc).__name__})")))
        finally:
            await stack.aclose()
