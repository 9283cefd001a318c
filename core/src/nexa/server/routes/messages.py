"""Anthropic's Messages API: ``POST /v1/messages`` (whole or streamed) and
``POST /v1/messages/count_tokens``.

The body becomes a ``ChatRequest`` (``nexa.server.messages_convert``) answered on the same
path as chat completions (``nexa.server.answer``). A stream follows Anthropic's event
sequence: ``message_start``, ``ping``, then per content block (thinking, text, tool_use)
``content_block_start``, its deltas (``thinking_delta`` + ``signature_delta``,
``text_delta``, ``input_json_delta``) and ``content_block_stop``, then ``message_delta``
(stop reason and usage) and ``message_stop``; a failure after the first byte is an
``error`` event. Errors before it are HTTP errors in Anthropic's shape
(``nexa.server.anthropic_errors``). A query string (``?beta=true``) and ``anthropic-beta``
headers change nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, post
from litestar.params import JSONBody

from nexa.errors import NexaError
from nexa.metrics import Metrics
from nexa.server import messages_convert as convert
from nexa.server import messages_wire as wire
from nexa.server.answer import Answer, Collected, collect_answer, start_stream
from nexa.server.anthropic_errors import anthropic_error, anthropic_error_responses
from nexa.server.deps import Config, Manager, MetricsDep
from nexa.server.errors import INFERENCE
from nexa.server.openapi import StreamingOperation
from nexa.server.work import SSE_HEADERS, EventStream, run_on_model, sse_event
from nexa.types import Task, ToolCall

log = logging.getLogger("nexa.server")


def _message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


async def _task(data: wire.CountTokensRequest, config: Any) -> convert.MessagesTask:
    has_media = any(
        not isinstance(m.content, str) and any(isinstance(b, wire.ImageBlock | wire.ToolResultBlock) for b in m.content)
        for m in data.messages
    )
    if has_media:  # images are fetched and decoded: off the event loop
        return await asyncio.to_thread(convert.messages_task, data, config)
    return convert.messages_task(data, config)


class MessagesController(Controller):
    path = "/v1/messages"
    tags = ["anthropic"]

    @post(status_code=200, summary="Create a message (Anthropic Messages API)",
          responses=anthropic_error_responses(*INFERENCE), operation_class=StreamingOperation)
    async def create(
        self,
        data: JSONBody[wire.MessagesRequest],
        request: Request,
        manager: Manager,
        config: Config,
        metrics: MetricsDep,
    ) -> wire.Message | EventStream:
        task = await _task(data, config)
        message_id = _message_id()
        if data.stream:
            answer = await start_stream(request, manager, task.chat, data.model)
            stream = MessagesStream(message_id, data.model, task.show_thinking, config.request_timeout, metrics)
            return EventStream(stream.frames(answer), headers=SSE_HEADERS)
        collected = await collect_answer(request, manager, task.chat, data.model, timeout=config.request_timeout,
                                         metrics=metrics)
        return convert.message_out(collected, message_id, data.model, task.show_thinking)

    @post("/count_tokens", status_code=200, summary="Count the tokens of a Messages prompt",
          responses=anthropic_error_responses(*INFERENCE))
    async def count_tokens(
        self,
        data: JSONBody[wire.CountTokensRequest],
        request: Request,
        manager: Manager,
        config: Config,
    ) -> wire.TokenCount:
        task = await _task(data, config)
        kind = Task.VLM if task.chat.has_images else Task.CHAT
        count = await run_on_model(request, manager, config, data.model, kind,
                                   lambda backend: backend.run_count_prompt_tokens(task.chat))
        return wire.TokenCount(input_tokens=count)


class MessagesStream:
    """The events of one streamed message."""

    def __init__(self, message_id: str, model: str, show_thinking: bool, timeout: float, metrics: Metrics) -> None:
        self.message_id = message_id
        self.model = model
        self.show_thinking = show_thinking
        self.timeout = timeout
        self.metrics = metrics
        self.index = -1
        self.open: str | None = None
        """The kind of the content block now open (``thinking``, ``text``), if any."""
        self.thinking = ""

    def _start(self, block: dict[str, Any]) -> bytes:
        self.index += 1
        self.open = block["type"]
        return sse_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                             "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        out = b""
        if self.open == "thinking":
            out = self._delta({"type": "signature_delta", "signature": convert.signature(self.thinking)})
            self.thinking = ""
        self.open = None
        return out + sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _switch(self, kind: str, block: dict[str, Any]) -> bytes:
        if self.open == kind:
            return b""
        return self._close() + self._start(block)

    def pieces(self, reasoning: str, content: str, calls: tuple[ToolCall, ...]) -> bytes:
        """The events for one chunk of the answer."""
        out = []
        if reasoning:
            out.append(self._switch("thinking", {"type": "thinking", "thinking": ""}))
            self.thinking += reasoning
            if self.show_thinking:
                out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        if content:
            out.append(self._switch("text", {"type": "text", "text": ""}))
            out.append(self._delta({"type": "text_delta", "text": content}))
        for call in calls:
            out.append(self._close())
            out.append(self._start({"type": "tool_use", "id": convert.call_id(call), "name": call.name, "input": {}}))
            arguments = msgspec.json.encode(convert.tool_input(call.arguments)).decode()
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
            out.append(self._close())
        return b"".join(out)

    def _head(self) -> bytes:
        message = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   # The prompt's size comes with the answer's end (message_delta).
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return sse_event("message_start", {"type": "message_start", "message": message}) + sse_event("ping", {"type": "ping"})

    async def frames(self, answer: Answer) -> AsyncIterator[bytes]:
        collected = Collected()
        head = self._head()
        try:
            async with asyncio.timeout(self.timeout):
                async for chunk in answer.chunks:
                    collected.add(chunk)
                    out = self.pieces(chunk.reasoning, chunk.content, chunk.tool_calls)
                    if out:
                        # message_start leaves with the first piece: one write, one wake-up.
                        yield head + out
                        head = b""
            if self.index < 0:  # nothing came: one empty text block, as a whole answer has
                head += self._start({"type": "text", "text": ""})
            usage = msgspec.to_builtins(convert.usage_out(collected.usage))
            tail = sse_event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": convert.stop_reason(collected), "stop_sequence": collected.stop_sequence},
                "usage": usage,
            })
            yield head + self._close() + tail + sse_event("message_stop", {"type": "message_stop"})
            answer.record(self.metrics, collected)
        except NexaError as exc:
            yield head + sse_event("error", anthropic_error(exc.status, exc.message))
        except TimeoutError:
            yield head + sse_event("error", anthropic_error(504, "the request ran past the server's request timeout"))
        except Exception as exc:
            log.exception("messages stream failed")
            yield head + sse_event("error", anthropic_error(500, f"internal error ({type(exc).__name__})"))
        finally:
            await answer.aclose()
