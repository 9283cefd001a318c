"""Who may talk to the server: the API key and the loopback Host check.

``make_guard`` builds the ``before_request`` hook every route runs through: on a
loopback-bound server the ``Host`` header must be a loopback name (DNS rebinding), and
when an API key is set every route but ``/health`` and the web page's files needs
``Authorization: Bearer KEY`` (the scheme is matched case-insensitively and surrounding
whitespace is ignored) or ``x-api-key: KEY`` (what Anthropic's clients send).
"""

from __future__ import annotations

import hmac
import ipaddress

from litestar import Request

from nexa.config import ServerConfig
from nexa.errors import Forbidden, Unauthorized

OPEN_PATHS = ("/health", "/")
"""Routes that need no API key: liveness probes, and the web page (which asks for the key)."""
OPEN_PREFIXES = ("/ui/",)
"""The web page's own files (HTML, CSS, JavaScript; no data)."""
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback_host(host: str) -> bool:
    """Whether a ``Host`` header value (or a bind address) names this machine's loopback."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_is_loopback(host: str) -> bool:
    """Whether ``nexa serve --host HOST`` listens on loopback only."""
    return is_loopback_host(host)


def presented_key_matches(request: Request, key: bytes) -> bool:
    """Whether the request carries ``key``: ``Authorization: Bearer KEY`` (OpenAI's clients)
    or ``x-api-key: KEY`` (Anthropic's). Either one matching is enough."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key):
        return True
    header = request.headers.get("x-api-key")
    return header is not None and hmac.compare_digest(header.strip().encode(), key)


def make_guard(config: ServerConfig):
    loopback_bind = bind_is_loopback(config.host)
    key = config.api_key.encode() if config.api_key else None

    async def guard(request: Request) -> None:
        if loopback_bind:
            # DNS rebinding: a web page on evil.example whose name resolves to 127.0.0.1
            # must not reach a loopback-only server.
            host = request.headers.get("host", "")
            if host and not is_loopback_host(host):
                raise Forbidden("requests to this loopback server must use a loopback Host name")
        path = request.url.path
        if key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES) \
                and request.method != "OPTIONS":
            if not presented_key_matches(request, key):
                raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key> or x-api-key: <key>)")

    return guard
