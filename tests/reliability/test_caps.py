"""Server caps: each limit is a clear 4xx in the OpenAI error shape, never a 500 or a hang.

Request body size (413), image bytes and pixels (413, also for a decompression bomb
that claims huge dimensions in a tiny file), images per request, ``max_tokens``, ``n``,
image ``size``, embedding batch size and input length, and context overflow (400
``context_length_exceeded``, also on a stream, before any event is sent). Each cap is
tested at its default where that is cheap, and lowered through ``ServerConfig`` where
the default would need a huge request.
"""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import pytest

import relkit
from nexa.testing import EchoBackend, echo_manifest, serve

MODEL = "test/echo"


def chat(server, content="hello there", **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)


def embed(server, input, **extra):
    return httpx.post(server.base_url + "/v1/embeddings", json={"model": MODEL, "input": input, **extra}, timeout=30)


def images(server, **extra):
    return httpx.post(server.base_url + "/v1/images/generations",
                      json={"model": MODEL, "prompt": "a square", "response_format": "b64_json", **extra}, timeout=30)


def image_chat(server, *urls):
    parts = [{"type": "text", "text": "what is this"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": parts}]})


@pytest.fixture
def server(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(MODEL, context_length=64)]) as handle:
        yield handle


@pytest.fixture
def tight(home):
    """A server with every cap lowered, so that crossing each one is a small request."""
    with serve(
        [EchoBackend], home=home, models=[echo_manifest(MODEL, context_length=64)],
        max_body_bytes=64 * 1024, max_image_bytes=4096, max_image_pixels=64 * 64, max_images_per_request=2,
        max_image_n=2, max_image_side=256, max_embed_batch=4, max_embed_input_chars=50,
    ) as handle:
        yield handle


# --- request body ----------------------------------------------------------------------


def test_body_over_the_limit_is_413(tight):
    r = chat(tight, content="word " * 20_000)  # ~100 KB of JSON against a 64 KiB cap
    relkit.assert_error(r, 413, "payload_too_large")
    assert chat(tight).status_code == 200


def test_chunked_body_without_length_over_the_limit_is_413(tight):
    def body():
        yield b'{"model": "test/echo", "messages": [{"role": "user", "content": "'
        for _ in range(200):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(tight.base_url + "/v1/chat/completions", content=body(), timeout=30,
                   headers={"Content-Type": "application/json"})
    relkit.assert_error(r, 413, "payload_too_large")


def test_default_body_limit_is_32_mib(server):
    big = b'{"model": "test/echo", "input": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    r = httpx.post(server.base_url + "/v1/embeddings", content=big, timeout=60,
                   headers={"Content-Type": "application/json"})
    relkit.assert_error(r, 413, "payload_too_large")


# --- images ----------------------------------------------------------------------------


def _noise_png(side: int) -> bytes:
    import random

    from PIL import Image

    rng = random.Random(side)
    img = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_image_bytes_over_the_limit_is_413(tight):
    png = _noise_png(48)  # ~7 KB of noise, within the pixel cap, over the 4096-byte cap
    assert len(png) > 4096
    err = relkit.assert_error(image_chat(tight, relkit.data_uri(png)), 413, "payload_too_large")
    assert "4096" in err["message"]


def test_image_pixels_over_the_limit_is_413(tight):
    png = relkit.tiny_png((80, 80))  # flat colour: tiny file, 6400 pixels > 4096
    assert len(png) < 4096
    err = relkit.assert_error(image_chat(tight, relkit.data_uri(png)), 413, "payload_too_large")
    assert "80x80" in err["message"]


def test_decompression_bomb_is_refused_from_its_header(server):
    bomb = _bomb_png(100_000, 100_000)  # 10^10 pixels claimed in ~100 bytes
    err = relkit.assert_error(image_chat(server, relkit.data_uri(bomb)), 413, "payload_too_large")
    assert "pixels" in err["message"]
    assert chat(server).status_code == 200


def test_too_many_images_is_400(tight):
    uri = relkit.data_uri(relkit.tiny_png())
    relkit.assert_error(image_chat(tight, uri, uri, uri), 400)
    r = image_chat(tight, uri, uri)
    assert r.status_code == 200, r.text


def test_not_an_image_is_400(server):
    err = relkit.assert_error(image_chat(server, relkit.data_uri(b"GIF89a but not really")), 400, "invalid_image")
    assert "decoded" in err["message"]
    relkit.assert_error(image_chat(server, "data:image/png;base64,!!!notbase64"), 400, "invalid_image")


# --- max_tokens and n ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_has_no_upper_bound(server, field):
    # Agents send 32k-128k; the backend caps it at its context room instead of refusing.
    for value in (32769, 1_000_000, 2**62):
        r = chat(server, **{field: value})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_not_positive_is_400(server, value):
    relkit.assert_error(chat(server, max_tokens=value), 400)


def test_chat_n_other_than_1_is_400(server):
    err = relkit.assert_error(chat(server, n=2), 400)
    assert err["param"] == "n"


def test_image_n_over_the_cap_is_400(server, tight):
    relkit.assert_error(images(server, n=5), 400)  # default cap 4
    assert images(server, n=4, size="64x64").status_code == 200
    err = relkit.assert_error(images(tight, n=3, size="64x64"), 400)
    assert err["param"] == "n"


@pytest.mark.parametrize("size", ["4096x4096", "2049x64", "0x0", "7x64", "64", "64x64x64", "-64x64", "axb"])
def test_image_size_out_of_range_is_400(server, size):
    relkit.assert_error(images(server, size=size), 400)


def test_image_size_over_a_lowered_cap_is_400(tight):
    err = relkit.assert_error(images(tight, size="512x512"), 400)
    assert err["param"] == "size" and "256" in err["message"]
    assert images(tight, size="256x256").status_code == 200


# --- embeddings ------------------------------------------------------------------------


def test_embedding_batch_over_the_default_cap_is_400(server):
    relkit.assert_error(embed(server, ["a"] * 513), 400)
    assert embed(server, ["a"] * 512).status_code == 200


def test_embedding_batch_over_a_lowered_cap_is_400(tight):
    err = relkit.assert_error(embed(tight, ["a", "b", "c", "d", "e"]), 400)
    assert err["param"] == "input" and "4" in err["message"]
    relkit.assert_error(embed(tight, [[1], [2], [3], [4], [5]]), 400)


def test_embedding_input_too_long_is_refused(server, tight):
    relkit.assert_error(embed(server, "a" * 100_001), 400)  # the default cap, in the schema
    err = relkit.assert_error(embed(tight, "a" * 51), 413)  # a lowered cap
    assert "50" in err["message"]


@pytest.mark.parametrize("bad", ["", [], [""], ["a", 1], [[]], [-1], [[1, -2]], [1.5], [True]])
def test_embedding_input_of_the_wrong_shape_is_400(server, bad):
    relkit.assert_error(embed(server, bad), 400)


# --- context overflow ------------------------------------------------------------------


def test_context_overflow_is_400_context_length_exceeded(server):
    err = relkit.assert_error(chat(server, content="word " * 100), 400, "context_length_exceeded")
    assert "64" in err["message"]


def test_context_overflow_on_a_stream_is_an_http_error_not_an_event(server):
    r = chat(server, content="word " * 100, stream=True)
    relkit.assert_error(r, 400, "context_length_exceeded")


@pytest.mark.smollm2
def test_context_overflow_on_smollm2(needs_smollm2, home):
    """The real model: a prompt longer than the context is a 400, and the model still serves."""
    with serve(home=home, load_entry_points=True, context_length=128) as server:
        body = {"model": relkit.SMOLLM2, "messages": [{"role": "user", "content": "tell me a story " * 100}],
                "max_tokens": 8}
        r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
        relkit.assert_error(r, 400, "context_length_exceeded")
        r = httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120)
        relkit.assert_error(r, 400, "context_length_exceeded")
        ok = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
            "model": relkit.SMOLLM2, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert ok.status_code == 200, ok.text


@pytest.mark.smollm2
def test_max_tokens_cut_mid_character_on_smollm2(needs_smollm2, home):
    """An answer cut by ``max_tokens`` inside an emoji: no more tokens than asked, no U+FFFD."""
    bad = []
    with serve(home=home, load_entry_points=True, threads=1) as server:
        for max_tokens in range(1, 9):
            for seed in range(3):
                for stream in (False, True):
                    body = {"model": relkit.SMOLLM2, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
                            "stream": stream, "stream_options": {"include_usage": True} if stream else None,
                            "messages": [{"role": "user", "content": "Reply with only emoji: five happy faces."}]}
                    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
                    assert r.status_code == 200, r.text
                    if stream:
                        events = relkit.parse_sse(r.text)
                        text = relkit.check_chat_stream(r.text)
                        used = events[-1]["usage"]["completion_tokens"]
                    else:
                        text = relkit.check_chat_completion(r.json())
                        used = r.json()["usage"]["completion_tokens"]
                    if used > max_tokens or "\ufffd" in text:
                        bad.append((max_tokens, seed, stream, used, text))
    assert bad == []
