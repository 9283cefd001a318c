"""Images from clients are decoded only as PNG, JPEG, WebP or GIF, and never crash a request.

- Every decoder error is a 400 ``invalid_image``: each allowed format cut short at many
  offsets and with flipped bytes (fuzzed through ``nexa.server.media.check_image``, the
  one place images are decoded, and a sample over HTTP).
- What comes out is an image every backend reads: PNG or JPEG bytes that decode whole
  (WebP and GIF are re-encoded, one frame).
- Formats outside the list are refused without their decoder running (an EPS never
  reaches Pillow's Ghostscript loader).
- Local image paths the OS refuses (a NUL byte, a name over the file system's limit, an
  unknown ``~user``) are a 400, not a 500.
"""

from __future__ import annotations

import io
import random

import httpx
import pytest
from PIL import Image

import relkit
from nexa.config import ServerConfig
from nexa.errors import BadRequest, PayloadTooLarge
from nexa.server import media
from nexa.testing import EchoBackend, echo_manifest, serve

MODEL = "test/echo"
CONFIG = ServerConfig()


def _picture(mode: str = "RGB", size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = random.Random(7)
    img = Image.new(mode, size)
    img.putdata([tuple(rng.randrange(256) for _ in mode) if len(mode) > 1 else rng.randrange(256)
                 for _ in range(size[0] * size[1])])
    return img


def encode(fmt: str, **options) -> bytes:
    out = io.BytesIO()
    picture = _picture("RGBA" if fmt in ("PNG", "WEBP") else "RGB")
    if fmt == "GIF":
        # Two frames: only the first is decoded.
        picture.save(out, format="GIF", save_all=True, append_images=[_picture("RGB", (48, 40))], **options)
    elif fmt == "EPS":
        picture.convert("RGB").save(out, format="EPS")
    else:
        picture.convert("RGB" if fmt in ("JPEG", "BMP", "PPM", "PCX", "TGA", "ICO") else picture.mode).save(
            out, format=fmt, **options)
    return out.getvalue()


ALLOWED = {"PNG": encode("PNG"), "JPEG": encode("JPEG", quality=80), "WEBP": encode("WEBP"),
           "WEBP-lossless": encode("WEBP", lossless=True), "GIF": encode("GIF"),
           "JPEG-progressive": encode("JPEG", progressive=True)}
OUTSIDE = {fmt: encode(fmt) for fmt in ("BMP", "TIFF", "ICO", "PPM", "PCX", "TGA", "EPS", "DDS", "SGI", "IM")}


def _outcome(data: bytes) -> str:
    """What ``check_image`` made of ``data``: "ok" (checked here) or the error code."""
    try:
        part = media.check_image(data, CONFIG)
    except (BadRequest, PayloadTooLarge) as exc:
        assert exc.code in ("invalid_image", "payload_too_large"), exc.code
        assert exc.param == "messages"
        return exc.code
    # A backend gets PNG or JPEG that decodes whole.
    assert part.mime in ("image/png", "image/jpeg"), part.mime
    with Image.open(io.BytesIO(part.data), formats=["PNG", "JPEG"]) as img:
        img.load()
    return "ok"


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_each_allowed_format_decodes(name):
    assert _outcome(ALLOWED[name]) == "ok"


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_cut_short_anywhere_is_invalid_image_or_a_whole_image(name):
    data = ALLOWED[name]
    offsets = sorted({0, 1, 2, 4, 8, 16, 32, len(data) - 1, *range(0, len(data), max(1, len(data) // 60))})
    # Each outcome is checked by _outcome: a 400, or an image that decodes whole (a GIF
    # cut in its second frame still has its first).
    outcomes = {offset: _outcome(data[:offset]) for offset in offsets if offset < len(data)}
    assert all(outcomes[o] == "invalid_image" for o in offsets if o <= 32), outcomes


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_flipped_bytes_are_invalid_image_or_a_whole_image(name):
    data = ALLOWED[name]
    rng = random.Random(name)
    outcomes = []
    for _ in range(150):
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 2, 8))):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        outcomes.append(_outcome(bytes(damaged)))  # raises on anything but ok / a 4xx
    assert "invalid_image" in outcomes


@pytest.mark.parametrize("fmt", sorted(OUTSIDE))
def test_formats_outside_the_list_are_refused(fmt):
    assert _outcome(OUTSIDE[fmt]) == "invalid_image"
    assert _outcome(OUTSIDE[fmt][: len(OUTSIDE[fmt]) // 2]) == "invalid_image"


@pytest.fixture
def server(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with serve([EchoBackend], home=home, models=[echo_manifest(MODEL)]) as handle:
        yield handle


def ask(server, url):
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": parts}]})


def test_eps_never_reaches_its_decoder(server, monkeypatch):
    from PIL import EpsImagePlugin

    opened = []
    original = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open",
                        lambda self: opened.append(1) or original(self))
    err = relkit.assert_error(ask(server, relkit.data_uri(OUTSIDE["EPS"], "image/eps")), 400, "invalid_image")
    assert "PNG, JPEG, WebP or GIF" in err["message"]
    assert opened == []


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_over_http_cut_short_images_are_400(server, name):
    data = ALLOWED[name]
    for offset in (1, 16, len(data) // 3, len(data) // 2, len(data) * 2 // 3):
        relkit.assert_error(ask(server, relkit.data_uri(data[:offset])), 400, "invalid_image")
    r = ask(server, relkit.data_uri(data))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("[1 image(s)]"), r.text


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "EPS"])
def test_over_http_other_formats_whole_or_cut_are_400(server, fmt):
    for data in (OUTSIDE[fmt], OUTSIDE[fmt][: len(OUTSIDE[fmt]) // 2]):
        relkit.assert_error(ask(server, relkit.data_uri(data)), 400, "invalid_image")


@pytest.mark.parametrize("path", [
    "ok.png\u0000x",             # a NUL byte: ValueError from the OS layer
    "a" * 300 + ".png",          # over the file system's 255-byte name limit
    "d/" * 3000 + "x.png",       # over PATH_MAX
    "~nosuchuser1234/x.png",     # an unknown user's home
    "file://%00.png",
])
def test_local_paths_the_os_refuses_are_400(server, tmp_path, path):
    (tmp_path / "ok.png").write_bytes(relkit.tiny_png())
    relkit.assert_error(ask(server, path), 400, "invalid_image")
    assert ask(server, "ok.png").status_code == 200
