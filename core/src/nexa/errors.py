"""Domain errors. The server maps each to one HTTP status and the OpenAI error shape.

Backends raise these (or plain exceptions, which become 500) and never build HTTP
responses themselves.
"""

from __future__ import annotations


class NexaError(Exception):
    """Base of every error the server reports to a client."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class BadRequest(NexaError):
    """The client's request is wrong (a field out of range, a value the model can't
    honour); ``param`` names the field."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    """The prompt is longer than the model's context allows."""

    code = "context_length_exceeded"


class UnsupportedTask(BadRequest):
    """The model cannot do what the endpoint asks (embeddings from a chat model)."""

    code = "model_not_supported"


class ModelNotFound(NexaError):
    """No model of that name in the store or in an installed package."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(NexaError):
    """A resource the request names (a stored response) does not exist here."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Unauthorized(NexaError):
    """An API key is set and the request lacks it (or has another)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(NexaError):
    """Refused whatever the credentials: a request to a loopback-only server whose ``Host``
    is not a loopback name (DNS rebinding), or one a browser sent from another site
    (code ``cross_site_request``)."""

    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class ModelNotLoaded(NexaError):
    """The model is in the store but not resident (management of loaded models)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_loaded"


class Conflict(NexaError):
    """The request contradicts the server's current state (a model resident with other settings)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class UnsupportedMediaType(NexaError):
    """The body's ``Content-Type`` is not the one the route takes."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class PayloadTooLarge(NexaError):
    """A request body, image or input over the server's size caps."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Busy(NexaError):
    """The model's queue is full; the client should retry after ``retry_after`` seconds."""

    status = 503
    type = "server_error"
    code = "server_busy"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ModelUnloaded(NexaError):
    """The model was unloaded on request (``/v1/admin/models/unload``, mode ``cancel``)
    while this request waited for it or ran on it."""

    status = 503
    type = "server_error"
    code = "model_unloaded"


class NoBackend(NexaError):
    """No installed backend can serve this model on this device; the message says why."""

    status = 400
    type = "invalid_request_error"
    code = "no_backend"


class ModelLoadError(NexaError):
    """The model's files could not be loaded (corrupt, truncated, wrong format)."""

    status = 500
    type = "server_error"
    code = "model_load_failed"


class StoreError(NexaError):
    """A pull, import or removal failed."""

    status = 400
    type = "invalid_request_error"
    code = "store_error"


class RepoNotFound(StoreError):
    """The hub has no such repo (or hides it: private or gated without a token)."""

    status = 404
    code = "repo_not_found"


class Cancelled(Exception):
    """Raised inside a backend's work when its request was cancelled."""
