"""ASGI middleware: request counts and latency per endpoint, and a clean answer to a
request cancelled before it replied (client gone, or cut off at shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec

from nexa.errors import NexaError
from nexa.metrics import Metrics
from nexa.server.errors import error_payload

ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/images/files",
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/models",
    "/v1/plugins",
    "/v1/admin",
    "/health",
    "/metrics",
)
"""Path prefixes counted under their own label on ``/metrics``; anything else is ``other``."""


def metrics_middleware(metrics: Metrics):
    def factory(app: Any) -> Any:
        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope.get("path", "")
            endpoint = next((e for e in ENDPOINTS if path.startswith(e)), "other")
            status = {"code": 500, "sent": False}
            started = time.monotonic()

            async def send_wrapper(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    status["sent"] = True
                await send(message)

            try:
                await app(scope, receive, send_wrapper)
            except asyncio.CancelledError:
                # The request was cancelled: its client left, or uvicorn cut it off past
                # the shutdown grace period. A client still there gets an OpenAI-shaped
                # 503 instead of uvicorn's plain-text 500 (and no traceback in the log).
                if status["sent"]:
                    raise
                status["code"] = 503
                body = msgspec.json.encode(error_payload(NexaError(
                    "the server is shutting down or the request was cancelled; try again",
                    code="shutting_down")))
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.start", "status": 503, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"retry-after", b"1"), (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
            finally:
                metrics.requests.labels(endpoint, str(status["code"])).inc()
                metrics.latency.labels(endpoint).observe(time.monotonic() - started)

        return middleware

    return factory
