"""The web page at ``/``: plain HTML, CSS and JavaScript shipped in the package
(``nexa/server/page/``), no build step and nothing fetched from the network.

The page and its files carry no secret, so they are served without the API key (the page
asks for the key and sends it on its own API calls); the loopback Host check still
applies. A strict Content-Security-Policy allows only this server's own scripts, styles
and API, and no framing.
"""

from __future__ import annotations

from pathlib import Path

from litestar import get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from litestar.response import File

PAGE_DIR = Path(__file__).resolve().parent.parent / "page"
ASSET_PREFIX = "/ui/"
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data: blob:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files, changed with each release: revalidate rather than serve a stale page.
    "Cache-Control": "no-cache",
}


def _file(name: str) -> File:
    path = PAGE_DIR / name
    return File(path, media_type=_TYPES[path.suffix], filename=name, content_disposition_type="inline",
                headers=PAGE_HEADERS)


@get("/", include_in_schema=False)
async def page_index() -> File:
    return _file("index.html")


@get(ASSET_PREFIX + "{name:str}", include_in_schema=False)
async def page_asset(name: FromPath[str]) -> File:
    # Only the page's own files by exact name: no paths, no directory listing.
    if "/" in name or "\\" in name or name.startswith(".") or Path(name).suffix not in _TYPES \
            or not (PAGE_DIR / name).is_file():
        raise NotFoundException(f"no page file {name!r}")
    return _file(name)
