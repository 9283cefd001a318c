"""Who may talk to the server, and in what form: one guard on every route.

``make_guard`` builds the app-level Litestar guard (app guards add to, never replace, the
guards of routers and controllers, so a route added later can't skip it). In order:

1. **Host** (DNS rebinding): on a loopback-bound server the ``Host`` header must be a
   loopback name.
2. **API key**: when one is set, every route but ``/health`` and the web page's own
   files (``/``, ``/ui/*``: no data; the page asks for the key) needs
   ``Authorization: Bearer KEY`` (OpenAI's clients) or ``x-api-key: KEY`` (Anthropic's).
   The scheme is matched case-insensitively (``bearer``), scheme and key are separated by
   one or more spaces, and whitespace around the header and the key (spaces, tabs) is
   ignored; the key itself is compared in constant time.
3. **Cross-site** (a web page the user visits driving the server from their browser):
   a request that can change something (any method but GET, HEAD and OPTIONS) is refused
   when the browser says it comes from another site (``Sec-Fetch-Site: cross-site`` or
   ``same-site``, since another port on this host is another site too) or, from browsers
   that don't send that header, when its ``Origin`` is not this server. Origins named by
   ``--origins`` are allowed. GET and HEAD are never refused for this: opening the
   server's pages in a browser must work.
4. **Content type**: a body must come as the route takes it: ``application/json``
   (or ``multipart/form-data`` where the route says so). A ``text/plain`` POST is what a
   web page can send without asking the browser first (a CORS "simple request").
"""

from __future__ import annotations

import hmac
import ipaddress
import urllib.parse

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from nexa.config import ServerConfig
from nexa.errors import Forbidden, Unauthorized, UnsupportedMediaType
from nexa.server.body import declared_body

OPEN_PATHS = ("/health", "/")
"""Routes that need no API key: liveness probes, and the web page (which asks for the key)."""
OPEN_PREFIXES = ("/ui/",)
"""The web page's own files (HTML, CSS, JavaScript; no data)."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing: never refused as cross-site, and carry no body we read."""
JSON = "application/json"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


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


def _same_origin(origin: str, host: str) -> bool:
    """Whether ``Origin`` names the host and port the request was sent to (its ``Host``)."""
    try:
        sent_from = urllib.parse.urlsplit(origin.strip())
        sent_to = urllib.parse.urlsplit("//" + host.strip())
        default = _DEFAULT_PORTS.get(sent_from.scheme.lower())
        return (
            sent_from.scheme.lower() in _DEFAULT_PORTS
            and sent_from.hostname is not None
            and sent_from.hostname == sent_to.hostname
            and (sent_from.port or default) == (sent_to.port or default)
        )
    except ValueError:
        return False


def cross_site_reason(connection: ASGIConnection, origins: tuple[str, ...]) -> str | None:
    """Why this request counts as cross-site (a sentence), or None when it doesn't."""
    headers = connection.headers
    origin = headers.get("origin")
    if origin is not None and ("*" in origins or origin in origins):
        return None
    site = headers.get("sec-fetch-site", "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"the browser sent it from another site (Sec-Fetch-Site: {site}, Origin: {origin or 'none'})"
    if site in ("same-origin", "none"):
        return None
    if origin is not None and not _same_origin(origin, headers.get("host", "")):
        return f"its Origin ({origin}) is not this server"
    return None


def _has_body(connection: ASGIConnection) -> bool:
    length = connection.headers.get("content-length", "").strip()
    if length and length != "0":
        return True
    return "chunked" in connection.headers.get("transfer-encoding", "").lower()


def check_content_type(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """A body must arrive in the media type the route takes (JSON unless it says otherwise)."""
    if connection.scope.get("method", "GET") in SAFE_METHODS or not _has_body(connection):
        return
    spec = declared_body(handler)
    expected = spec.media_type if spec is not None else JSON
    sent = connection.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if sent != expected:
        raise UnsupportedMediaType(
            f"this endpoint takes Content-Type: {expected}, not {sent or 'none'}", param="Content-Type"
        )


def presented_key_matches(connection: ASGIConnection, key: bytes) -> bool:
    """Whether the request carries ``key``: ``Authorization: Bearer KEY`` (OpenAI's clients)
    or ``x-api-key: KEY`` (Anthropic's). Either one matching is enough."""
    scheme, _, token = connection.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key):
        return True
    header = connection.headers.get("x-api-key")
    return header is not None and hmac.compare_digest(header.strip().encode(), key)


def make_guard(config: ServerConfig):
    loopback_bind = bind_is_loopback(config.host)
    key = config.api_key.encode() if config.api_key else None
    origins = tuple(config.origins)

    async def guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        method = connection.scope.get("method", "GET")
        if loopback_bind:
            # DNS rebinding: a web page on evil.example whose name resolves to 127.0.0.1
            # must not reach a loopback-only server.
            host = connection.headers.get("host", "")
            if host and not is_loopback_host(host):
                raise Forbidden("requests to this loopback server must use a loopback Host name")
        path = connection.url.path
        if key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES) and method != "OPTIONS":
            if not presented_key_matches(connection, key):
                raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key> or x-api-key: <key>)")
        if method not in SAFE_METHODS:
            reason = cross_site_reason(connection, origins)
            if reason is not None:
                raise Forbidden(
                    f"cross-site request refused: {reason}. Start the server with --origins ORIGIN "
                    "to let a web site use it",
                    code="cross_site_request",
                )
        check_content_type(connection, handler)

    return guard
