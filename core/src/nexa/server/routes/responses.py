"""OpenAI's Responses API: ``POST /v1/responses`` (whole or streamed), ``GET`` and
``DELETE /v1/responses/{id}``.

The body (and, with ``previous_response_id``, the stored conversation before it) becomes
a ``ChatRequest`` (``nexa.server.responses_convert``) answered on the same path as chat
completions (``nexa.server.answer``). With ``store`` (the default) the response is saved
(``nexa.server.responses_store``) once it is complete.

A stream is OpenAI's event sequence, each event numbered (``sequence_number``):
``response.created``, ``response.in_progress``; per output item
``response.output_item.added``, for text and reasoning ``response.content_part.added``,
the deltas (``response.output_text.delta`` with ``logprobs: []``,
``response.reasoning_text.delta``, ``response.function_call_arguments.delta``,
``response.custom_tool_call_input.delta``) and their ``.done`` events,
``response.output_item.done``; then ``response.completed``, or ``response.incomplete``
when the output limit cut the answer. A failure after the first byte is an ``error``
event followed by ``response.failed``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post, route
from litestar.enums import HttpMethod
from litestar.params import FromPath, JSONBody

from nexa.errors import NexaError, NotFound
from nexa.metrics import Metrics
from nexa.server import responses_convert as convert
from nexa.server import responses_wire as wire
from nexa.server.answer import Answer, Collected, collect_answer, start_stream
from nexa.server.deps import Config, Manager, MetricsDep, Responses
from nexa.server.errors import GUARDED, INFERENCE, error_responses, scrub
from nexa.server.openapi import StreamingOperation
from nexa.server.responses_store import ResponseStore, StoredResponse
from nexa.server.work import SSE_HEADERS, EventStream, sse_event
from nexa.types import ToolCall

log = logging.getLogger("nexa.server")


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"no stored response {response_id!r} (never stored, deleted, or past the store's limits)",
                    param="response_id")


class ResponsesController(Controller):
    path = "/v1/responses"
    tags = ["responses"]

    @post(status_code=200, summary="Create a response (OpenAI Responses API)",
          responses=error_responses(*INFERENCE), operation_class=StreamingOperation)
    async def create(
        self,
        data: JSONBody[wire.ResponsesRequest],
        request: Request,
        manager: Manager,
        config: Config,
        metrics: MetricsDep,
        responses: Responses,
    ) -> wire.ResponseObject | EventStream:
        history = await responses.history(data.previous_response_id) if data.previous_response_id else []
        if isinstance(data.input, list) or history:  # items may carry images to fetch: off the loop
            task = await asyncio.to_thread(convert.responses_task, data, config, history)
        else:
            task = convert.responses_task(data, config, history)
        response_id = convert.new_id("resp")
        created_at = convert.now()
        if data.stream:
            answer = await start_stream(request, manager, task.chat, data.model)
            stream = ResponsesStream(data, task, response_id, created_at, responses, metrics)
            return EventStream(stream.frames(answer, config.request_timeout), headers=SSE_HEADERS)
        collected = await collect_answer(request, manager, task.chat, data.model, timeout=config.request_timeout,
                                         metrics=metrics)
        status = "incomplete" if collected.cut_by_limit else "completed"
        response = convert.response_object(data, response_id, created_at, status=status,
                                           output=convert.output_items(collected, task.offered),
                                           usage=convert.usage_out(collected))
        await _save(responses, data, task, response)
        return response

    @get("/{response_id:str}", summary="Retrieve a stored response", responses=error_responses(404, *GUARDED))
    async def retrieve(self, response_id: FromPath[str], responses: Responses) -> wire.ResponseObject:
        record = await responses.get(response_id)
        if record is None:
            raise _not_found(response_id)
        return msgspec.convert(record.response, wire.ResponseObject)

    @delete("/{response_id:str}", status_code=200, summary="Delete a stored response",
            responses=error_responses(404, *GUARDED))
    async def remove(self, response_id: FromPath[str], responses: Responses) -> wire.DeletedResponse:
        if not await responses.delete(response_id):
            raise _not_found(response_id)
        return wire.DeletedResponse(id=response_id)

    @route("/{response_id:str}", http_method=HttpMethod.OPTIONS, include_in_schema=False)
    async def allowed(self) -> Response[None]:
        # Stated here: Litestar's own OPTIONS answer for a path served by two handlers
        # lists only one of their methods.
        return Response(None, status_code=204, headers={"Allow": "DELETE, GET, OPTIONS"})


async def _save(store: ResponseStore, data: wire.ResponsesRequest, task: convert.ResponsesTask,
                response: wire.ResponseObject) -> None:
    if data.store:
        await store.put(StoredResponse(id=response.id, response=msgspec.to_builtins(response),
                                       input_items=list(task.items), previous_id=data.previous_response_id))


class ResponsesStream:
    """The numbered events of one streamed response."""

    def __init__(self, data: wire.ResponsesRequest, task: convert.ResponsesTask, response_id: str, created_at: int,
                 store: ResponseStore, metrics: Metrics) -> None:
        self.data = data
        self.task = task
        self.response_id = response_id
        self.created_at = created_at
        self.store = store
        self.metrics = metrics
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        """Output items closed so far, in order."""
        self.open: tuple[str, str, str] | None = None
        """The item being streamed: (kind ``reasoning``/``message``, item id, text so far)."""

    def emit(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(kind, payload)

    def _response(self, status: str, **extra: Any) -> dict[str, Any]:
        return msgspec.to_builtins(convert.response_object(self.data, self.response_id, self.created_at,
                                                           status=status, **extra))

    def _open(self, kind: str) -> bytes:
        if self.open is not None and self.open[0] == kind:
            return b""
        out = self._close("completed")
        item_id = convert.new_id("rs" if kind == "reasoning" else "msg")
        self.open = (kind, item_id, "")
        if kind == "reasoning":
            item = convert.reasoning_item(item_id, None, "in_progress")
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = convert.message_item(item_id, None, "in_progress")
            part = convert.output_text("")
        index = len(self.output)
        return (out + self.emit("response.output_item.added", output_index=index, item=item)
                + self.emit("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                            part=part))

    def _close(self, status: str) -> bytes:
        if self.open is None:
            return b""
        kind, item_id, text = self.open
        self.open = None
        index = len(self.output)
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        if kind == "reasoning":
            item = convert.reasoning_item(item_id, text, status)
            out = (self.emit("response.reasoning_text.done", **where, text=text)
                   + self.emit("response.content_part.done", **where, part={"type": "reasoning_text", "text": text}))
        else:
            item = convert.message_item(item_id, text, status)
            out = (self.emit("response.output_text.done", **where, text=text, logprobs=[])
                   + self.emit("response.content_part.done", **where, part=convert.output_text(text)))
        self.output.append(item)
        return out + self.emit("response.output_item.done", output_index=index, item=item)

    def _text(self, kind: str, delta: str) -> bytes:
        out = self._open(kind)
        assert self.open is not None
        _, item_id, text = self.open
        self.open = (kind, item_id, text + delta)
        where = {"item_id": item_id, "output_index": len(self.output), "content_index": 0}
        if kind == "reasoning":
            return out + self.emit("response.reasoning_text.delta", **where, delta=delta)
        return out + self.emit("response.output_text.delta", **where, delta=delta, logprobs=[])

    def _call(self, call: ToolCall) -> bytes:
        out = self._close("completed")
        index = len(self.output)
        done = convert.call_item(call, self.task.offered)
        custom = done["type"] == "custom_tool_call"
        field = "input" if custom else "arguments"
        added = {**done, field: "", "status": "in_progress"}
        where = {"item_id": done["id"], "output_index": index}
        prefix = "response.custom_tool_call_input" if custom else "response.function_call_arguments"
        done_fields = {"input": done["input"]} if custom else {"name": done["name"], "arguments": done["arguments"]}
        self.output.append(done)
        return (out + self.emit("response.output_item.added", output_index=index, item=added)
                + self.emit(f"{prefix}.delta", **where, delta=done[field])
                + self.emit(f"{prefix}.done", **where, **done_fields)
                + self.emit("response.output_item.done", output_index=index, item=done))

    def pieces(self, reasoning: str, content: str, calls: tuple[ToolCall, ...]) -> bytes:
        out = b""
        if reasoning:
            out += self._text("reasoning", reasoning)
        if content:
            out += self._text("message", content)
        for call in calls:
            out += self._call(call)
        return out

    async def frames(self, answer: Answer, timeout: float) -> AsyncIterator[bytes]:
        collected = Collected()
        head = (self.emit("response.created", response=self._response("in_progress"))
                + self.emit("response.in_progress", response=self._response("in_progress")))
        try:
            async with asyncio.timeout(timeout):
                async for chunk in answer.chunks:
                    collected.add(chunk)
                    out = self.pieces(chunk.reasoning, chunk.content, chunk.tool_calls)
                    if out:
                        yield head + out
                        head = b""
            status = "incomplete" if collected.cut_by_limit else "completed"
            if not self.output and self.open is None:
                head += self._open("message")  # nothing came: one empty message, as a whole answer has
            tail = head + self._close(status)
            response = convert.response_object(self.data, self.response_id, self.created_at, status=status,
                                               output=self.output, usage=convert.usage_out(collected))
            answer.record(self.metrics, collected)
            await _save(self.store, self.data, self.task, response)
            yield tail + self.emit(f"response.{status}", response=msgspec.to_builtins(response))
        except Exception as exc:
            if isinstance(exc, NexaError):
                code, message = exc.code or exc.type, exc.message
            elif isinstance(exc, TimeoutError):
                code, message = "timeout", "the request ran past the server's request timeout"
            else:
                log.exception("responses stream failed")
                code, message = "server_error", f"internal error ({type(exc).__name__})"
            message = scrub(message)
            error = wire.ResponseError(code=code, message=message)
            failed = self._response("failed", output=self.output, error=error)
            yield (head + self.emit("error", code=code, message=message, param=None)
                   + self.emit("response.failed", response=failed))
        finally:
            await answer.aclose()
