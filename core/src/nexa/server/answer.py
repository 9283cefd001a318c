"""One model answer for the API dialects that translate it (Anthropic Messages, OpenAI
Responses): the same ``manager.acquire`` + ``Backend.stream_answer`` path as chat
completions, with the dialect's own framing around it.

- ``open_answer`` holds a slot of the model, starts the answer and waits for its first
  chunk, so that what fails before any output (unknown model, a prompt over the context,
  a bad template) is a real HTTP error, not a stream event.
- ``collect_answer`` runs a whole answer (cancelled when the client leaves or the
  request times out) and returns it ``Collected``.
- ``Collected`` gathers the pieces of an answer (text, reasoning, tool calls, finish
  reason, usage); streaming writers feed it too, for their closing events.

Tool calls reach these dialects whole (``nexa.answer.whole_tool_calls``: their writers
frame whole calls); a limit on their number (Anthropic's ``disable_parallel_tool_use``,
OpenAI's ``parallel_tool_calls: false``) is ``ChatRequest.max_tool_calls``, applied by
``Backend.stream_answer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import attrs
from litestar import Request

from nexa.answer import whole_tool_calls
from nexa.manager import ModelManager
from nexa.metrics import Metrics
from nexa.server.routes.chat import record_generation
from nexa.server.work import until_disconnected
from nexa.types import ChatChunk, ChatRequest, Task, ToolCall, Usage


@attrs.define(eq=False)
class Collected:
    """An answer as it has come so far."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = attrs.field(factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage = Usage()
    first_at: float | None = None
    """When the first piece of answer arrived (time to first token)."""

    def add(self, chunk: ChatChunk) -> None:
        if self.first_at is None and (chunk.content or chunk.reasoning or chunk.tool_calls):
            self.first_at = time.monotonic()
        self.content += chunk.content
        self.reasoning += chunk.reasoning
        self.tool_calls.extend(chunk.tool_calls)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.stop_sequence = chunk.stop_sequence
        if chunk.usage is not None:
            self.usage = chunk.usage

    @property
    def cut_by_limit(self) -> bool:
        """The answer ended because it reached ``max_tokens`` or the context's end."""
        return self.finish_reason == "length"


@attrs.define(eq=False)
class Answer:
    """A started answer: its chunks (the first already awaited) and the slot it holds."""

    chunks: AsyncIterator[ChatChunk]
    started: float
    model: str
    _stack: contextlib.AsyncExitStack

    async def aclose(self) -> None:
        """Stop the generation (if still running) and free the slot."""
        await self._stack.aclose()

    def record(self, metrics: Metrics, collected: Collected) -> None:
        """Token counts, time to first token and decode speed, for ``/metrics``."""
        record_generation(metrics, self.model, collected.usage, self.started, collected.first_at)


async def open_answer(manager: ModelManager, chat: ChatRequest, model: str) -> Answer:
    """Start ``chat`` on a slot of ``model`` and wait for its first chunk."""
    task = Task.VLM if chat.has_images else Task.CHAT
    stack = contextlib.AsyncExitStack()
    lease = manager.acquire(model, task)
    try:
        backend = await stack.enter_async_context(lease)
        started = time.monotonic()
        chunks = whole_tool_calls(backend.stream_answer(chat))
        stack.push_async_callback(chunks.aclose)
        first = await anext(chunks, None)
    except BaseException as exc:
        await stack.aclose()
        # The model was unloaded under this request (mode cancel): say so to the client.
        if isinstance(exc, asyncio.CancelledError) and (unloaded := lease.take_revocation()) is not None:
            raise unloaded from None
        raise

    async def pieces() -> AsyncIterator[ChatChunk]:
        # Whichever task reads the answer (a stream's own task) is what an unload cancels;
        # the cancellation then reaches the reader as ModelUnloaded, an error like any other.
        lease.adopt()
        try:
            if first is not None:
                yield first
            async for chunk in chunks:
                yield chunk
        except asyncio.CancelledError:
            unloaded = lease.take_revocation()
            if unloaded is None:
                raise
            raise unloaded from None

    return Answer(pieces(), started, model, stack)


async def start_stream(request: Request, manager: ModelManager, chat: ChatRequest, model: str) -> Answer:
    """``open_answer``, abandoned (slot freed) if the client leaves before the first chunk."""
    return await until_disconnected(request, open_answer(manager, chat, model))


async def collect_answer(
    request: Request,
    manager: ModelManager,
    chat: ChatRequest,
    model: str,
    *,
    timeout: float,
    metrics: Metrics,
) -> Collected:
    """A whole answer, cancelled when the client leaves or after ``timeout`` seconds."""

    async def run() -> Collected:
        answer = await open_answer(manager, chat, model)
        collected = Collected()
        try:
            async for chunk in answer.chunks:
                collected.add(chunk)
        finally:
            await answer.aclose()
        answer.record(metrics, collected)
        return collected

    return await until_disconnected(request, asyncio.wait_for(run(), timeout))
