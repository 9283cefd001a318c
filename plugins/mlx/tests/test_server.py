"""The MLX backend behind the real HTTP server, spoken to with the official openai client."""

from __future__ import annotations

import os

import openai
import pytest
from tiny_model import MODEL_NAME

from nexa.testing import serve
from nexa_mlx.backend import MlxBackend
from nexa_mlx.vision import MlxVisionBackend

HELLO = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def client(tiny_folder, tmp_path_factory):
    # The nox Metal session sets NEXA_DEVICE=metal; everywhere else MLX runs on the CPU
    # (a CUDA box would otherwise be detected as cuda, which MLX doesn't serve here).
    device = "metal" if os.environ.get("NEXA_DEVICE") == "metal" else "cpu"
    home = tmp_path_factory.mktemp("server-home")
    with serve([MlxBackend, MlxVisionBackend], home=home, device=device, backend="mlx") as server:
        server.store.import_path(tiny_folder, name=MODEL_NAME)
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def stream_text(client, **kwargs) -> tuple[str, list]:
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=HELLO, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_stream_with_usage_matches_the_non_streamed_answer(client):
    text, chunks = stream_text(client, max_tokens=16, temperature=0)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (15, 16, 31)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3

    whole = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 16


def test_stop_over_http(client):
    full, _ = stream_text(client, max_tokens=30, temperature=0)
    stop = full[8:11]
    text, chunks = stream_text(client, max_tokens=30, temperature=0, stop=[stop])
    assert text == full[: full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    single = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=30, temperature=0, stop=stop)
    assert single.choices[0].message.content == text


def test_seed_reproducible_over_http(client):
    a, _ = stream_text(client, max_tokens=20, temperature=1.0, seed=42)
    b, _ = stream_text(client, max_tokens=20, temperature=1.0, seed=42)
    c, _ = stream_text(client, max_tokens=20, temperature=1.0, seed=43)
    assert a == b != c


def test_context_overflow_and_images_are_400s(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hello world " * 400}], max_tokens=4
        )
    assert exc.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL_NAME, messages=HELLO, max_tokens=4, response_format={"type": "json_object"}
        )
    assert exc.value.body["param"] == "response_format"


def test_a_zero_repeat_penalty_is_a_400(client):
    # Multiplicative: 0 would divide by zero in MLX's penalty; refused at the edge.
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=4, extra_body={"repeat_penalty": 0})
    assert exc.value.body["param"] == "repeat_penalty"
