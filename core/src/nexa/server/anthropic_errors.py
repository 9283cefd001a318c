"""Errors on the Anthropic routes (``/v1/messages...``) in Anthropic's shape and statuses.

``{"type": "error", "error": {"type": ..., "message": ...}}``: 400 invalid_request_error,
401 authentication_error, 403 permission_error, 404 not_found_error, 413
request_too_large, 429 rate_limit_error, 500 api_error, 504 timeout_error, and a full
queue (OpenAI's 503) as 529 overloaded_error, which Anthropic's clients retry.

The mapping of exceptions to statuses and messages stays in one place
(``nexa.server.errors``): ``with_anthropic_shape`` wraps those handlers and reshapes what
they answer when the request's path is an Anthropic one, so a bad body, a missing key, an
unknown model or an unknown method there all come back in the shape the client parses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from litestar import Request, Response
from litestar.openapi.datastructures import ResponseSpec

from nexa.server.errors import scrub
from nexa.server.messages_wire import ErrorResponse

ANTHROPIC_PREFIX = "/v1/messages"
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OVERLOADED = 529


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def anthropic_status(status: int) -> int:
    """Anthropic's status for one of ours: a full queue (503) is 529 ``overloaded``."""
    return OVERLOADED if status == 503 else status


def error_type(status: int) -> str:
    status = anthropic_status(status)
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": scrub(message)}}


Handler = Callable[[Request, Any], Response[Any]]


def with_anthropic_shape(handlers: Mapping[type[BaseException], Handler]) -> dict[type[BaseException], Handler]:
    """The same handlers, answering in Anthropic's shape on Anthropic paths."""

    def wrap(handler: Handler) -> Handler:
        def handle(request: Request, exc: Any) -> Response[Any]:
            response = handler(request, exc)
            if not is_anthropic_path(request.url.path):
                return response
            body = response.content if isinstance(response.content, dict) else {}
            message = str((body.get("error") or {}).get("message") or "error")
            status = response.status_code
            return Response(
                anthropic_error(status, message),
                status_code=anthropic_status(status),
                headers=dict(response.headers or {}),
                media_type="application/json",
            )

        return handle

    return {exc_type: wrap(handler) for exc_type, handler in handlers.items()}


_DESCRIPTIONS = {
    400: "invalid_request_error: a bad body, a field out of range, a prompt over the context",
    401: "authentication_error: missing or wrong API key (x-api-key or Authorization: Bearer)",
    403: "permission_error: Host header not a loopback name on a loopback-bound server, or a cross-site "
         "request from a browser (an origin not allowed by --origins)",
    404: "not_found_error: no such model (the message lists the served ones) or route",
    413: "request_too_large: request body or image larger than the server allows",
    415: "invalid_request_error: the body is not application/json",
    500: "api_error: the model could not be loaded, or an unexpected error",
    504: "timeout_error: the request ran past the server's request timeout",
    529: "overloaded_error: the model's queue is full; retry after the Retry-After header's seconds",
}


def anthropic_error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI ``responses`` entries for an Anthropic route: its statuses and error shape."""
    return {
        code: ResponseSpec(data_container=ErrorResponse, description=_DESCRIPTIONS[code], generate_examples=False)
        for code in sorted({anthropic_status(s) for s in statuses})
    }
