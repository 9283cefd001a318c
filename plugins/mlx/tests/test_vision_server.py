"""MLX vision models behind the real HTTP server: images sent as data URIs with the openai client."""

from __future__ import annotations

import base64
import os
import time

import httpx
import openai
import pytest
from tiny_model import MODEL_NAME
from tiny_vision import VISION_MODEL_NAME, png

from nexa.testing import serve
from nexa_mlx.backend import MlxBackend
from nexa_mlx.vision import MlxVisionBackend

RED = png(64, 64, (255, 0, 0))
BLUE = png(64, 64, (0, 0, 255))
# Long enough that a generation cut short by a disconnect is told apart from one that ran.
CONTEXT = 16384


def uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def look(*images: bytes, text: str = "What is this?") -> list[dict]:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": uri(image)}} for image in images]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def server(tiny_folder, vision_folder, tmp_path_factory):
    device = "metal" if os.environ.get("NEXA_DEVICE") == "metal" else "cpu"
    home = tmp_path_factory.mktemp("vision-server-home")
    with serve(
        [MlxBackend, MlxVisionBackend], home=home, device=device, backend="mlx", context_length=CONTEXT
    ) as server:
        server.store.import_path(tiny_folder, name=MODEL_NAME)
        server.store.import_path(vision_folder, name=VISION_MODEL_NAME)
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def stream(client, messages, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(
        model=VISION_MODEL_NAME, messages=messages, stream=True,
        stream_options={"include_usage": True}, **kwargs,
    ))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_image_chat_streams_with_usage_and_counts_the_image(client):
    text, chunks = stream(client, look(RED), max_tokens=30, temperature=0)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3
    usage = chunks[-1].usage
    text_only = client.chat.completions.create(
        model=VISION_MODEL_NAME, messages=[{"role": "user", "content": "What is this?"}], max_tokens=1
    ).usage.prompt_tokens
    # The 64x64 image: 4 image tokens between the vision start and end markers.
    assert (usage.prompt_tokens, usage.completion_tokens) == (text_only + 6, 30)

    whole = client.chat.completions.create(model=VISION_MODEL_NAME, messages=look(RED), max_tokens=30, temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.usage.completion_tokens == 30


def test_the_image_reaches_the_model(client):
    red, _ = stream(client, look(RED), max_tokens=16, temperature=0)
    blue, _ = stream(client, look(BLUE), max_tokens=16, temperature=0)
    assert red != blue


def test_seed_and_stop_over_http(client):
    a, _ = stream(client, look(RED), max_tokens=20, temperature=1.0, seed=42)
    b, _ = stream(client, look(RED), max_tokens=20, temperature=1.0, seed=42)
    c, _ = stream(client, look(RED), max_tokens=20, temperature=1.0, seed=43)
    assert a == b != c
    full, _ = stream(client, look(RED), max_tokens=30, temperature=0)
    stop = full[6:9]
    text, chunks = stream(client, look(RED), max_tokens=30, temperature=0, stop=[stop])
    assert text == full[: full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_client_disconnect_frees_the_model_at_once(server, client):
    body = {"model": VISION_MODEL_NAME, "messages": look(RED), "max_tokens": CONTEXT - 100,
            "temperature": 0, "stream": True}
    started = time.monotonic()
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and '"content":"' in line:
                    break  # leaving the block closes the connection mid-generation
    # One request at a time per model: this one waits unless generation really stopped.
    answer = client.chat.completions.create(model=VISION_MODEL_NAME, messages=look(RED), max_tokens=3)
    assert answer.usage.completion_tokens == 3
    took = time.monotonic() - started
    # The full answer would be ~16k tokens; measure what it would cost to compare.
    timed = time.monotonic()
    client.chat.completions.create(model=VISION_MODEL_NAME, messages=look(RED), max_tokens=400, temperature=0)
    per_400 = time.monotonic() - timed
    # Generous against a busy machine (the two timings may see different load), still far
    # below the ~40x of per_400 that running the full answer to the end would take.
    assert took < max(10.0, per_400 * 10), (took, per_400)


def test_a_text_only_mlx_model_refuses_images_with_a_400(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL_NAME, messages=look(RED), max_tokens=2)
    assert exc.value.body["code"] == "model_not_supported"
    assert "is not a vision (image+text) model (it serves: chat)" in exc.value.body["message"]
    # Text on the same model is still served.
    answer = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert answer.usage.completion_tokens == 2


def test_unsupported_requests_are_400s(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=VISION_MODEL_NAME, messages=look(RED), max_tokens=2, response_format={"type": "json_object"}
        )
    assert exc.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=VISION_MODEL_NAME, max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}],
        )
