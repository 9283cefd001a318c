"""Every error the HTTP layer returns, in OpenAI's shape, mapped in one place.

``{"error": {"message", "type", "param", "code"}}`` with the right status. Domain errors
(``nexa.errors``) carry their own status; framework errors (validation, unknown route,
body too large) are translated; anything else is a 500 whose message names no path and
carries no traceback (those go to the server log).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from nexa.errors import Busy, NexaError
from nexa.server.schemas import ErrorResponse

log = logging.getLogger("nexa.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
          415: "unsupported_media_type", 429: "rate_limit_exceeded"}


# An absolute path (POSIX or Windows) inside a message. Backends and libraries put the
# files they failed on into their messages; clients get the last component only. The
# server's own API paths (/v1/..., /health) are left alone.
_POSIX_PATH = re.compile(r"(?<![\w.:/~-])(?!/(?:v1|health|metrics|schema)\b)(?:/[^\s/'\"`()<>,;:]+)+/?")
_WINDOWS_PATH = re.compile(r"(?<![\w])[A-Za-z]:\\(?:[^\s\\'\"`()<>,;]+\\?)*")


def _last_part(match: re.Match[str]) -> str:
    return re.split(r"[/\\]", match.group(0).rstrip("/\\"))[-1]


def scrub(message: str) -> str:
    """``message`` with every absolute path cut to its last component."""
    return _WINDOWS_PATH.sub(_last_part, _POSIX_PATH.sub(_last_part, message))


def error_payload(exc: NexaError) -> dict[str, Any]:
    return {"error": {"message": scrub(exc.message), "type": exc.type, "param": exc.param, "code": exc.code}}


def _response(status: int, message: str, type_: str, param: str | None, code: str | None,
              headers: dict[str, str] | None = None) -> Response[dict[str, Any]]:
    return Response(
        {"error": {"message": scrub(message), "type": type_, "param": param, "code": code}},
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def nexa_error(_: Request, exc: NexaError) -> Response[dict[str, Any]]:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
    if exc.status >= 500 and not isinstance(exc, Busy):
        log.warning("request failed: %s", exc.message)
    return _response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)


def validation_error(request: Request, exc: ValidationException) -> Response[dict[str, Any]]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    param = None
    message = str(exc.detail)
    if extra and isinstance(extra[0], dict):
        first = extra[0]
        param = first.get("key") or None
        detail = first.get("message") or ""
        message = f"{detail}" + (f" (at {param})" if param else "")
    if "JSON" in message and "decode" in message.lower() or message.startswith("Malformed"):
        message = "the request body is not valid JSON"
    if param == "data":
        # Bodies are decoded in nexa.server.body; Litestar only notices a missing one.
        if request.content_type[0] == "multipart/form-data":
            message = "the form is empty: this endpoint takes multipart/form-data with its fields and file"
        else:
            message = "the request body is missing: this endpoint takes a JSON object"
        param = None
    return _response(400, message or "invalid request", "invalid_request_error", param, "invalid_request")


def http_error(_: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    message = str(exc.detail) if exc.detail else "error"
    if status >= 500:
        log.error("HTTP %s: %s", status, message)
        message = "internal server error"
    headers = dict(exc.headers or {})
    return _response(status, message, _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                     None, _CODES.get(status), headers or None)


def timeout_error(_: Request, exc: TimeoutError) -> Response[dict[str, Any]]:
    # asyncio.wait_for(..., request_timeout) ends here; the work was already cancelled.
    return _response(504, "the request ran past the server's request timeout", "server_error", None, "timeout")


def internal_error(_: Request, exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error", exc_info=exc)
    return _response(500, f"internal server error ({type(exc).__name__})", "server_error", None, "internal_error")


EXCEPTION_HANDLERS = {
    NexaError: nexa_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    TimeoutError: timeout_error,
    Exception: internal_error,
}

_DESCRIPTIONS = {
    400: "Invalid request (bad JSON, a field out of range, a server cap exceeded, context overflow)",
    401: "Missing or wrong API key (only when the server has one)",
    403: "Host header not a loopback name on a loopback-bound server (DNS rebinding), or a cross-site "
         "request from a browser (an origin not allowed by --origins)",
    404: "No such model or resource (or, for management, the model is not loaded)",
    409: "The model is already loaded with other settings",
    413: "Request body, image or input larger than the server allows",
    415: "The body is not in the endpoint's media type (application/json, or multipart/form-data where stated)",
    500: "The model could not be loaded, or an unexpected error (no paths or tracebacks are shown)",
    503: "The model's queue is full (retry after the Retry-After header's seconds), or the model was "
         "unloaded while the request used it",
    504: "The request ran past the server's request timeout",
}

# Every route may meet the access guard and an unexpected failure.
GUARDED = (401, 403, 500)
INFERENCE = (400, 404, 413, 415, 503, 504, *GUARDED)
"""Statuses an inference endpoint (chat, embeddings, images) can answer with."""


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI ``responses`` entries so the document states every error and its OpenAI shape.

    Without them Litestar documents only its own 400 body, and a client generated from
    the document (or a fuzzer reading it) expects the wrong error shape.
    """
    return {
        status: ResponseSpec(
            data_container=ErrorResponse, description=_DESCRIPTIONS[status], generate_examples=False
        )
        for status in sorted(set(statuses))
    }
