"""How a request's work runs: on a model slot, cancelled when the client leaves or the
request times out (``until_disconnected``, ``run_on_model``), and streamed as
Server-Sent Events (``EventStream``, ``sse``, ``sse_event``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.response import Stream

from nexa.backend import Backend
from nexa.config import ServerConfig
from nexa.manager import ModelManager
from nexa.types import Task

T = TypeVar("T")


def sse(payload: Any) -> bytes:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def sse_event(name: str, payload: Any) -> bytes:
    """One named Server-Sent Event (``event: NAME``), as Anthropic's and the Responses API's
    streams frame every event."""
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(Stream):
    """A Server-Sent Events stream. The handler's JSON media type must not override it."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; cancel it if the client goes away first."""
    work = asyncio.ensure_future(awaitable)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not work.done():
            # We are being cancelled (server shutdown past its grace period): let the
            # work unwind before the caller closes what it was using (an async
            # generator closed while still running raises RuntimeError, sent as a 500).
            work.cancel()
            with contextlib.suppress(BaseException):
                await work


async def run_on_model(
    request: Request,
    manager: ModelManager,
    config: ServerConfig,
    model: str,
    task: Task,
    call: Callable[[Backend], Awaitable[T]],
    *,
    keep_alive: float | None = None,
) -> T:
    """One non-streaming request on a slot of ``model``, cancelled on disconnect or timeout."""

    async def work() -> T:
        async with manager.acquire(model, task, keep_alive=keep_alive) as backend:
            return await call(backend)

    return await until_disconnected(request, asyncio.wait_for(work(), config.request_timeout))
