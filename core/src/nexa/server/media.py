"""Fetching and checking images named in chat messages.

Backends receive images only as bytes (``ImagePart``); this module is the one place that
turns an ``image_url`` into bytes. ``data:`` URIs are always accepted; local paths only
under the allowed media folders, resolved with symlinks so nothing escapes; http(s) only
when enabled, to public addresses only (the resolved address is checked and pinned, no
redirects), with size and time caps.

Every image is decoded once, here, and only as one of the formats vision models take
(``ALLOWED_FORMATS``: PNG, JPEG, WebP, GIF's first frame), chosen explicitly when Pillow
opens it: no other decoder runs on a client's bytes (an EPS would otherwise reach
Pillow's Ghostscript loader). Any decoder failure is a 400 ``invalid_image``. PNG and
JPEG reach backends as sent; WebP and GIF are re-encoded to PNG (one frame), so a backend
only ever decodes the two formats every image library reads.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
import urllib.parse
from pathlib import Path

from nexa.config import ServerConfig
from nexa.errors import BadRequest, PayloadTooLarge
from nexa.types import ImagePart

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
"""Pillow format names of the images the server decodes; every other format is refused."""
_PASSED_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg"}


def _bad(message: str) -> BadRequest:
    return BadRequest(message, param="messages", code="invalid_image")


def check_image(data: bytes, config: ServerConfig) -> ImagePart:
    """Decode the image (its first frame) within the byte and pixel caps; 400/413 otherwise."""
    if len(data) > config.max_image_bytes:
        raise PayloadTooLarge(
            f"image is {len(data)} bytes; the limit is {config.max_image_bytes}", param="messages"
        )
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            width, height = img.size
            if width * height > config.max_image_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} pixels; the limit is {config.max_image_pixels}",
                    param="messages",
                )
            fmt = img.format or ""
            # The whole first frame: a truncated or corrupt file fails here, not in a backend.
            img.load()
            if fmt in _PASSED_AS_IS:
                return ImagePart(data, _PASSED_AS_IS[fmt])
            out = io.BytesIO()
            img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB").save(
                out, format="PNG")
            return ImagePart(out.getvalue(), "image/png")
    except PayloadTooLarge:
        raise
    except Image.DecompressionBombError:
        # Pillow refuses a header claiming over twice its own limit before we see the size.
        raise PayloadTooLarge(
            f"image claims more pixels than the limit of {config.max_image_pixels}", param="messages"
        ) from None
    except Exception as exc:
        # Decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError,
        # IndexError... on bad input: all of them mean "not an image we read".
        kind = "" if isinstance(exc, Image.UnidentifiedImageError) else f" ({type(exc).__name__})"
        raise _bad(
            f"image could not be decoded{kind}: send PNG, JPEG, WebP or GIF"
        ) from None


def _from_data_uri(url: str, config: ServerConfig) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise _bad("a data: image URL must be base64 encoded (data:image/png;base64,...)")
    if len(payload) > config.max_image_bytes * 4 // 3 + 8:
        raise PayloadTooLarge(
            f"image is larger than the limit of {config.max_image_bytes} bytes", param="messages"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the data: image URL is not valid base64") from None


def _allowed_dirs(config: ServerConfig) -> list[Path]:
    dirs = config.media_dirs or (Path.cwd(),)
    return [Path(d).expanduser().resolve() for d in dirs]


def _from_path(raw: str, config: ServerConfig) -> bytes:
    try:
        return _read_local(raw, config)
    except (OSError, ValueError, RuntimeError) as exc:
        # What the OS (or pathlib) refuses: a NUL byte, a name over the file system's
        # limit, an unknown ~user, a loop of links, no permission...
        raise _bad(f"local image path could not be read ({type(exc).__name__})") from None


def _read_local(raw: str, config: ServerConfig) -> bytes:
    path = Path(urllib.parse.unquote(raw[7:]) if raw.startswith("file://") else raw).expanduser()
    dirs = _allowed_dirs(config)
    if not path.is_absolute():
        path = dirs[0] / path
    resolved = path.resolve()
    if not any(resolved.is_relative_to(d) for d in dirs):
        raise _bad(
            "local image paths must be inside the server's media folders "
            "(the folder `nexa serve` runs in, or --media-dir)"
        )
    if not resolved.is_file():
        raise _bad("local image file not found")
    if resolved.stat().st_size > config.max_image_bytes:
        raise PayloadTooLarge(
            f"image is larger than the limit of {config.max_image_bytes} bytes", param="messages"
        )
    return resolved.read_bytes()


# IPv6 prefixes that carry an IPv4 address in their last 32 bits and can reach it:
# IPv4-compatible (Linux routes ::/96 through a sit tunnel), IPv4-translated (SIIT) and
# NAT64 (a NAT64 gateway on the network forwards 64:ff9b::10.0.0.1 to 10.0.0.1).
_V4_IN_LAST_32 = tuple(
    ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48")
)

REMOTE_TIMEOUT = 10.0
"""Seconds a remote image may take: each network step, and the whole download."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _V4_IN_LAST_32):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    """True only for globally routable unicast addresses (no loopback, private, metadata...).

    An IPv6 address that embeds an IPv4 one (``::ffff:127.0.0.1``, ``::127.0.0.1``,
    ``2002:7f00:1::``, NAT64, Teredo) must be public both ways.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and (not inner.is_global or inner.is_multicast):
            return False
    return True


def _from_http(url: str, config: ServerConfig) -> bytes:
    if not config.allow_remote_images:
        raise _bad(
            "http(s) image URLs are disabled on this server; send a data: URI or start it "
            "with --allow-remote-images"
        )
    import httpx

    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise _bad("image URL is malformed (host or port)") from None
    if not host:
        raise _bad("image URL has no host")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise _bad("image URL host could not be resolved") from None
    addresses = [info[4][0] for info in infos]
    # Every answer must be public: an attacker's DNS may mix a public and a private one.
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise _bad("image URL points at a private, loopback or link-local address")
    pinned = addresses[0]
    # Connect to the checked address, never a second DNS answer (DNS rebinding).
    transport = httpx.HTTPTransport(retries=0)
    target = parts._replace(netloc=f"[{pinned}]:{port}" if ":" in pinned else f"{pinned}:{port}")
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": host} if parts.scheme.lower() == "https" else {}
    too_big = PayloadTooLarge(
        f"image is larger than the limit of {config.max_image_bytes} bytes", param="messages"
    )
    deadline = time.monotonic() + REMOTE_TIMEOUT
    try:
        with httpx.Client(
            transport=transport, timeout=REMOTE_TIMEOUT, follow_redirects=False, trust_env=False
        ) as client:
            with client.stream(
                "GET", urllib.parse.urlunsplit(target), headers=headers, extensions=extensions
            ) as resp:
                if resp.status_code != 200:
                    # Redirects too: following one would skip the address check.
                    raise _bad(f"image URL answered HTTP {resp.status_code}")
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > config.max_image_bytes:
                    raise too_big
                data = bytearray()
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > config.max_image_bytes:
                        raise too_big
                    if time.monotonic() > deadline:
                        raise _bad(f"image URL took longer than {REMOTE_TIMEOUT:g} s")
                return bytes(data)
    except httpx.HTTPError as exc:
        raise _bad(f"image URL could not be fetched ({type(exc).__name__})") from None


def fetch_image(url: str, config: ServerConfig) -> ImagePart:
    """Bytes of the image named by ``url``, checked; BadRequest/PayloadTooLarge otherwise."""
    url = url.strip()
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        data = _from_data_uri(url, config)
    elif lowered.startswith(("http://", "https://")):
        data = _from_http(url, config)
    elif lowered.startswith("file://") or "://" not in url:
        data = _from_path(url, config)
    else:
        raise _bad("unsupported image URL scheme; use data:, a local path, or http(s)")
    return check_image(data, config)
