"""Conformance checks every backend of a task must pass (used by plugin test suites).

Each function takes a backend instance that is already ``start()``-ed, runs the async
interface the server uses, and raises AssertionError with a clear message on a breach.
"""

from __future__ import annotations

import asyncio
import io
import math
import time

from nexa.backend import Backend
from nexa.types import ChatMessage, ChatRequest, EmbedRequest, ImageRequest


def _run(coro):  # noqa: ANN001, ANN202
    return asyncio.run(coro)


async def _started(backend: Backend) -> Backend:
    await backend.start()
    return backend


async def check_chat_async(backend: Backend, prompt: str = "Say hello in three words.") -> None:
    request = ChatRequest(messages=[ChatMessage("user", prompt)], max_tokens=8, temperature=0.0, seed=1)
    chunks = [c async for c in backend.stream_chat(request)]
    assert chunks, "stream_chat yielded nothing"
    last = chunks[-1]
    assert last.finish_reason in {"stop", "length", "tool_calls"}, f"bad finish_reason {last.finish_reason!r}"
    assert all(c.finish_reason is None for c in chunks[:-1]), "finish_reason before the last chunk"
    assert last.usage is not None and last.usage.prompt_tokens > 0, "last chunk lacks usage"
    assert last.usage.completion_tokens <= 8, "max_tokens not honoured"
    text = "".join(c.content for c in chunks)
    assert isinstance(text, str)
    # Deterministic at temperature 0.
    again = "".join([c.content async for c in backend.stream_chat(request)])
    assert again == text, "temperature 0 with a seed is not reproducible"
    # Closing the stream early must stop the work and free the worker promptly.
    long = ChatRequest(messages=[ChatMessage("user", prompt)], max_tokens=2000, temperature=0.0)
    stream = backend.stream_chat(long)
    await anext(stream)
    started = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - started < 5, "closing a stream did not stop generation"
    # max_tokens=1 ends with length unless the model stopped at once.
    one = [c async for c in backend.stream_chat(
        ChatRequest(messages=[ChatMessage("user", prompt)], max_tokens=1, temperature=0.0))]
    assert one[-1].usage is not None and one[-1].usage.completion_tokens <= 1


async def check_embed_async(backend: Backend) -> None:
    texts = ["the cat sat on the mat", "quantum chromodynamics", "the cat sat on the mat"]
    result = await backend.run_embed(EmbedRequest(inputs=texts))
    assert len(result.vectors) == len(texts), "one vector per input"
    dims = {len(v) for v in result.vectors}
    assert len(dims) == 1 and dims.pop() > 0, "vectors must share one positive dimension"
    for v in result.vectors:
        assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3, "vectors must be L2-normalised"
    same = sum(a * b for a, b in zip(result.vectors[0], result.vectors[2], strict=True))
    assert same > 0.999, "the same text must embed the same"
    assert result.prompt_tokens > 0, "prompt_tokens must be counted"


async def check_images_async(backend: Backend, size: int = 64) -> None:
    from PIL import Image

    result = await backend.run_images(
        ImageRequest(prompt="a red square", n=2, width=size, height=size, seed=7, steps=2)
    )
    assert len(result.images) == 2, "n images expected"
    for png in result.images:
        assert png[:8] == b"\x89PNG\r\n\x1a\n", "images must be PNG"
        with Image.open(io.BytesIO(png)) as img:
            assert img.size == (size, size), f"wrong size {img.size}"
    again = await backend.run_images(
        ImageRequest(prompt="a red square", n=2, width=size, height=size, seed=7, steps=2)
    )
    assert again.images == result.images, "same seed must give the same images"


def check_chat(backend: Backend) -> None:
    _run(check_chat_async(backend))


def check_embed(backend: Backend) -> None:
    _run(check_embed_async(backend))


def check_images(backend: Backend) -> None:
    _run(check_images_async(backend))
