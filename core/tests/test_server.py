"""The HTTP server end to end on loopback, with the echo test double as the backend."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
import time

import httpx
import openai
import pytest

from nexa.backend import Backend
from nexa.testing import EchoBackend, echo_manifest, serve, wait_until
from nexa.types import Manifest, ModelFile, Task

USER = [{"role": "user", "content": "one two three four"}]


@pytest.fixture
def server(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(), echo_manifest("test/slow", delay=0.05)]) as handle:
        yield handle


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def post(server, path, body, **kw):
    return httpx.post(server.base_url + path, json=body, timeout=30, **kw)


def assert_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def test_chat_with_openai_client(client):
    r = client.chat.completions.create(model="test/echo", messages=USER, max_tokens=64)
    assert r.choices[0].message.content == "one two three four"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 4, 8)


def test_chat_max_tokens_gives_length(client):
    r = client.chat.completions.create(model="test/echo", messages=USER, max_completion_tokens=2)
    assert r.choices[0].message.content == "one two"
    assert r.choices[0].finish_reason == "length"


def test_stream_sse_framing_and_usage(server):
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={
        "model": "test/echo", "messages": USER, "stream": True, "stream_options": {"include_usage": True},
    }) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three four"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_stream_with_openai_client_and_stop(client):
    stream = client.chat.completions.create(model="test/echo", messages=USER, stream=True, stop=["three"])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "one two "


def test_seed_curl_bodies_work_unchanged(server):
    # The seed document's LLM request body, byte for byte apart from the model name.
    body = {"model": "test/echo", "messages": [{"role": "user", "content": "Hello! Briefly introduce yourself."}],
            "max_tokens": 256, "temperature": 0.7, "stream": False}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = post(server, "/v1/embeddings", {"model": "test/echo", "input": "Hello, world!"})
    assert r.status_code == 200 and r.json()["data"][0]["object"] == "embedding"
    r = post(server, "/v1/images/generations", {"model": "test/echo", "prompt": "A white cat with blue eyes",
                                                "n": 1, "size": "64x64", "response_format": "url"})
    assert r.status_code == 200
    png = httpx.get(r.json()["data"][0]["url"]).content
    assert png.startswith(b"\x89PNG")


def test_vision_request_with_data_uri_reaches_backend_as_bytes(server, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (8, 8), "red").save(path)
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    r = post(server, "/v1/chat/completions", {"model": "test/echo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what colour"}, {"type": "image_url", "image_url": {"url": uri}}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "[1 image(s)] what colour"


def test_bad_image_is_400(server):
    r = post(server, "/v1/chat/completions", {"model": "test/echo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]})
    assert_error(r, 400, "invalid_image")


def test_tool_call_response_shape(client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model="test/echo", messages=USER, tools=tools, tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup" and json.loads(call.function.arguments)["text"]
    stream = client.chat.completions.create(model="test/echo", messages=USER, tools=tools,
                                            tool_choice={"type": "function", "function": {"name": "lookup"}},
                                            stream=True)
    deltas = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].function.name == "lookup" and deltas[0][0].index == 0


def test_embeddings_float_base64_and_dimensions(client, server):
    floats = client.embeddings.create(model="test/echo", input=["a b", "c"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    vec = floats.data[0].embedding
    assert abs(sum(v * v for v in vec) - 1) < 1e-5
    # The openai client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model="test/echo", input=["a b", "c"])
    assert default.data[0].embedding == pytest.approx(vec, abs=1e-6)
    raw = post(server, "/v1/embeddings", {"model": "test/echo", "input": "a b", "encoding_format": "base64"}).json()
    decoded = struct.unpack(f"<{len(vec)}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(decoded) == pytest.approx(vec, abs=1e-6)
    short = client.embeddings.create(model="test/echo", input="a b", dimensions=4, encoding_format="float")
    assert len(short.data[0].embedding) == 4
    assert abs(sum(v * v for v in short.data[0].embedding) - 1) < 1e-5
    assert floats.usage.prompt_tokens == 3
    assert_error(post(server, "/v1/embeddings", {"model": "test/echo", "input": "x", "dimensions": 999}), 400)
    tokens = post(server, "/v1/embeddings", {"model": "test/echo", "input": [[1, 2], [3]]}).json()
    assert len(tokens["data"]) == 2


@pytest.mark.parametrize("body, status, param", [
    ({"model": "test/echo"}, 400, None),
    ({"model": "test/echo", "messages": []}, 400, None),
    ({"model": "test/echo", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ({"model": "test/echo", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"model": "test/echo", "messages": USER, "temperature": 9}, 400, "temperature"),
    ({"model": "test/echo", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "test/echo", "messages": USER, "n": 2}, 400, "n"),
    ({"model": "test/echo", "messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    # Checked here once, not again by backends (the llama.cpp plugin's own checks went).
    ({"model": "test/echo", "messages": USER, "tool_choice": "sometimes"}, 400, None),
    ({"model": "test/echo", "messages": USER, "tool_choice": {"type": "function", "function": {"name": "nope"}},
      "tools": [{"type": "function", "function": {"name": "lookup"}}]}, 400, "tool_choice"),
])
def test_bad_chat_bodies_are_400(server, body, status, param):
    error = assert_error(post(server, "/v1/chat/completions", body), status)
    if param:
        assert error["param"] == param


def test_malformed_json_is_400(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b'{"model": ',
                   headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="NexaAI/Qwen3-0.6B-GGUF", messages=USER)
    assert "nexa pull NexaAI/Qwen3-0.6B-GGUF" in info.value.body["message"]


def test_task_the_model_cannot_do_is_400(home):
    chat_only = Manifest(name="test/chat-only", format="echo", tasks={Task.CHAT})
    with serve([EchoBackend], home=home, models=[chat_only]) as handle:
        r = post(handle, "/v1/embeddings", {"model": "test/chat-only", "input": "hi"})
        error = assert_error(r, 400, "model_not_supported")
        assert "not an embedding model" in error["message"]


def test_body_too_large_is_413(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()], max_body_bytes=2000) as handle:
        r = post(handle, "/v1/chat/completions", {"model": "test/echo", "messages": [
            {"role": "user", "content": "x " * 5000}]})
        assert_error(r, 413)


def test_context_overflow_is_400(server):
    r = post(server, "/v1/chat/completions", {"model": "test/echo", "messages": [
        {"role": "user", "content": "word " * 300}]})
    assert_error(r, 400, "context_length_exceeded")
    r = post(server, "/v1/chat/completions", {"model": "test/echo", "stream": True, "messages": [
        {"role": "user", "content": "word " * 300}]})
    assert_error(r, 400, "context_length_exceeded")


def test_models_endpoints(server):
    listing = httpx.get(server.base_url + "/v1/models").json()
    assert {m["id"] for m in listing["data"]} == {"test/echo", "test/slow"}
    one = httpx.get(server.base_url + "/v1/models/test/echo").json()
    assert one["id"] == "test/echo" and one["object"] == "model"
    assert_error(httpx.get(server.base_url + "/v1/models/nope/nope"), 404, "model_not_found")
    # A loaded model's card says the context its backend gives it, and why.
    post(server, "/v1/chat/completions", {"model": "test/echo", "messages": [{"role": "user", "content": "hi"}]})
    one = httpx.get(server.base_url + "/v1/models/test/echo").json()
    assert one["loaded"] and (one["context_length"], one["context_reason"]) == (256, "the echo model's manifest")


def test_openapi_document_describes_every_endpoint(server):
    doc = httpx.get(server.base_url + "/schema/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/images/generations",
                 "/v1/models", "/health", "/v1/plugins", "/metrics"):
        assert path in doc["paths"], path
    chat_schema = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "ChatCompletionRequest" in json.dumps(chat_schema)


def test_token_limits_have_no_upper_bound_in_the_document(server):
    # Agents ask for 32k-128k output tokens; the backend caps them at its context room.
    schemas = httpx.get(server.base_url + "/schema/openapi.json").json()["components"]["schemas"]
    limits = {("ChatCompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_completion_tokens"),
              ("MessagesRequest", "max_tokens"), ("ResponsesRequest", "max_output_tokens")}
    for name, field in limits:
        spec = json.dumps(schemas[name]["properties"][field])
        assert '"minimum": 1' in spec and "maximum" not in spec, (name, field, spec)


def test_images_b64_and_size_validation(server):
    r = post(server, "/v1/images/generations", {"model": "test/echo", "prompt": "cat", "size": "64x32",
                                                "response_format": "b64_json", "n": 2})
    data = r.json()["data"]
    assert len(data) == 2
    from io import BytesIO

    from PIL import Image

    img = Image.open(BytesIO(base64.b64decode(data[0]["b64_json"])))
    assert img.size == (64, 32)
    assert_error(post(server, "/v1/images/generations", {"model": "test/echo", "prompt": "c", "size": "big"}), 400)
    assert_error(post(server, "/v1/images/generations", {"model": "test/echo", "prompt": "c", "size": "99999x8"}), 400)
    assert_error(post(server, "/v1/images/generations", {"model": "test/echo", "prompt": "c", "n": 10}), 400)
    assert_error(httpx.get(server.base_url + "/v1/images/files/../../etc/passwd"), 404)


class CountingBackend(EchoBackend):
    """Echo double that counts loads, to prove single-flight loading."""

    name = "counting"
    formats = frozenset({"counting"})
    loads = 0
    closes = 0
    lock = threading.Lock()

    def load(self):
        with CountingBackend.lock:
            CountingBackend.loads += 1

    def close(self):
        with CountingBackend.lock:
            CountingBackend.closes += 1


def counting(name, size=100, **options):
    return Manifest(name=name, format="counting", tasks={Task.CHAT}, options=options, context_length=999,
                    files=[ModelFile("weights.bin", size)])


def test_concurrent_requests_cause_one_load(home):
    CountingBackend.loads = 0
    gate = threading.Event()

    class GatedLoad(CountingBackend):
        def load(self):
            assert gate.wait(60), "the test never let the load finish"
            super().load()

    with serve([GatedLoad], home=home, models=[counting("test/a")]) as handle:
        async def many():
            async with httpx.AsyncClient(base_url=handle.base_url, timeout=60) as c:
                return await asyncio.gather(*[c.post("/v1/chat/completions", json={
                    "model": "test/a", "messages": USER}) for _ in range(8)])

        results = []
        clients = threading.Thread(target=lambda: results.extend(asyncio.run(many())))
        clients.start()
        # All eight wait on the one load before it may finish.
        wait_until(lambda: handle.metric('nexa_queue_depth{model="test/a"}') == 8, "8 requests wait")
        gate.set()
        clients.join(60)
        assert [r.status_code for r in results] == [200] * 8
        assert CountingBackend.loads == 1


def test_lru_eviction_under_memory_budget(home):
    CountingBackend.loads = CountingBackend.closes = 0
    models = [counting("test/a", 600), counting("test/b", 600)]
    with serve([CountingBackend], home=home, models=models, memory_budget=1000) as handle:
        for name in ("test/a", "test/b", "test/a"):
            assert post(handle, "/v1/chat/completions", {"model": name, "messages": USER}).status_code == 200
        assert CountingBackend.loads == 3 and CountingBackend.closes == 2
        loaded = httpx.get(handle.base_url + "/health").json()["models_loaded"]
        assert loaded == ["test/a"]
        metrics = httpx.get(handle.base_url + "/metrics").text
        assert 'nexa_model_evictions_total{model="test/a",reason="memory"} 1.0' in metrics


def test_keepalive_unloads_idle_model(home):
    CountingBackend.closes = 0
    with serve([CountingBackend], home=home, models=[counting("test/a")], keepalive=0.3) as handle:
        assert post(handle, "/v1/chat/completions", {"model": "test/a", "messages": USER}).status_code == 200
        assert httpx.get(handle.base_url + "/health").json()["models_loaded"] == ["test/a"]
        wait_until(lambda: httpx.get(handle.base_url + "/health").json()["models_loaded"] == [],
                   "the idle model is unloaded")
        assert CountingBackend.closes == 1


class GatedEcho(EchoBackend):
    """The echo double whose answers wait until the test opens ``gate``."""

    name = "gated-echo"
    gate = threading.Event()

    def chat(self, request, cancel):
        assert GatedEcho.gate.wait(60), "the test never opened the gate"
        yield from super().chat(request, cancel)


def test_full_queue_answers_503_with_retry_after(home):
    GatedEcho.gate.set()
    with serve([GatedEcho], home=home, models=[echo_manifest("test/slow")], queue_size=1, parallel=1) as handle:
        assert post(handle, "/v1/chat/completions", {"model": "test/slow", "messages": USER}).status_code == 200
        GatedEcho.gate.clear()
        held = []

        def send():
            held.append(post(handle, "/v1/chat/completions", {"model": "test/slow", "messages": USER}))

        running, waiting = threading.Thread(target=send), threading.Thread(target=send)
        running.start()
        wait_until(lambda: handle.metric('nexa_active_requests{model="test/slow"}') == 1, "one request runs")
        waiting.start()
        wait_until(lambda: handle.metric('nexa_queue_depth{model="test/slow"}') == 1, "one request waits")
        # The slot is busy and the queue full: the next three are turned away at once.
        refused = [post(handle, "/v1/chat/completions", {"model": "test/slow", "messages": USER})
                   for _ in range(3)]
        GatedEcho.gate.set()
        running.join(60)
        waiting.join(60)
        assert [r.status_code for r in held] == [200, 200]
        assert [r.status_code for r in refused] == [503, 503, 503]
        assert int(refused[0].headers["retry-after"]) >= 1
        assert refused[0].json()["error"]["code"] == "server_busy"


class SlowStream(Backend):
    """Test double that streams forever until cancelled, recording when it stopped."""

    name = "forever"
    tasks = frozenset({Task.CHAT})
    formats = frozenset({"forever"})
    stopped = threading.Event()

    def chat(self, request, cancel):
        from nexa.types import ChatChunk

        try:
            while not cancel.cancelled:
                time.sleep(0.01)
                yield ChatChunk(content="x")
        finally:
            SlowStream.stopped.set()


def test_client_disconnect_cancels_generation(home):
    SlowStream.stopped.clear()
    model = Manifest(name="test/forever", format="forever", tasks={Task.CHAT})
    with serve([SlowStream], home=home, models=[model]) as handle:
        with httpx.stream("POST", handle.base_url + "/v1/chat/completions", json={
            "model": "test/forever", "messages": USER, "stream": True}) as resp:
            for _ in zip(range(5), resp.iter_lines(), strict=False):
                pass
        assert SlowStream.stopped.wait(60), "generation kept running after the client left"
        SlowStream.stopped.clear()
        # Non-streaming: the client gives up (timeout) and the work stops too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(handle.base_url + "/v1/chat/completions",
                       json={"model": "test/forever", "messages": USER}, timeout=0.5)
        assert SlowStream.stopped.wait(60), "non-streaming generation kept running after the client left"
        # The slot is free again: a new request is served.
        with httpx.stream("POST", handle.base_url + "/v1/chat/completions", json={
            "model": "test/forever", "messages": USER, "stream": True}) as resp:
            assert resp.status_code == 200


def test_load_failure_is_structured_and_server_stays_up(home):
    bad = echo_manifest("test/bad", fail_load=True)
    with serve([EchoBackend], home=home, models=[bad, echo_manifest()]) as handle:
        r = post(handle, "/v1/chat/completions", {"model": "test/bad", "messages": USER})
        assert r.status_code >= 400 and r.json()["error"]["message"]
        assert post(handle, "/v1/chat/completions", {"model": "test/echo", "messages": USER}).status_code == 200


def test_api_key_and_host_check(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()], api_key="s3cret") as handle:
        error = assert_error(httpx.get(handle.base_url + "/v1/models"), 401, "invalid_api_key")
        assert "API key" in error["message"]
        ok = openai.OpenAI(base_url=handle.base_url + "/v1", api_key="s3cret").models.list()
        assert ok.data[0].id == "test/echo"
        assert httpx.get(handle.base_url + "/health").status_code == 200
        evil = httpx.get(handle.base_url + "/v1/models", headers={"Host": "evil.example", "Authorization": "Bearer s3cret"})
        assert_error(evil, 403)


def test_metrics_count_requests(server, client):
    client.chat.completions.create(model="test/echo", messages=USER)
    text = httpx.get(server.base_url + "/metrics").text
    assert 'nexa_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "nexa_time_to_first_token_seconds_bucket" in text
    assert 'nexa_generated_tokens_total{model="test/echo"} 4.0' in text


def test_metrics_include_backend_figures(server, client):
    client.chat.completions.create(model="test/echo", messages=USER)
    client.chat.completions.create(model="test/echo", messages=USER)
    text = httpx.get(server.base_url + "/metrics").text
    assert "# TYPE nexa_backend_echo_chats_started_total counter" in text
    assert 'nexa_backend_echo_chats_started_total{backend="echo",model="test/echo"} 2.0' in text


class BrokenFigures(EchoBackend):
    """The echo double whose runtime_metrics raises or misnames: scrapes must still work."""

    name = "broken-figures"

    def runtime_metrics(self):
        if self.manifest.name == "test/raises":
            raise RuntimeError("no figures today")
        from nexa.types import BackendMetric

        return [BackendMetric("Bad Name", 1.0), BackendMetric("fine", 3.0)]


def test_metrics_survive_a_backend_that_fails_to_report(home):
    models = [echo_manifest("test/raises"), echo_manifest("test/misnamed")]
    with serve([BrokenFigures], home=home, models=models) as handle:
        for name in ("test/raises", "test/misnamed"):
            assert post(handle, "/v1/chat/completions", {"model": name, "messages": USER}).status_code == 200
        resp = httpx.get(handle.base_url + "/metrics")
        assert resp.status_code == 200
        assert 'nexa_backend_fine{backend="broken-figures",model="test/misnamed"} 3.0' in resp.text
        assert "Bad Name" not in resp.text
        assert 'model="test/raises"' not in resp.text.split("nexa_backend_fine")[-1]


def test_model_in_use_is_never_evicted(home):
    SlowStream.stopped.clear()
    forever = Manifest(name="test/forever", format="forever", tasks={Task.CHAT}, files=[ModelFile("w", 900)])
    with serve([SlowStream, CountingBackend], home=home, models=[forever, counting("test/b", 900)],
               memory_budget=1000) as handle:
        with httpx.stream("POST", handle.base_url + "/v1/chat/completions", json={
                "model": "test/forever", "messages": USER, "stream": True}) as resp:
            lines = (line for line in resp.iter_lines() if line)
            next(lines)
            # B does not fit beside the busy model, which must stay loaded anyway.
            assert post(handle, "/v1/chat/completions", {"model": "test/b", "messages": USER}).status_code == 200
            assert not SlowStream.stopped.is_set()
            loaded = httpx.get(handle.base_url + "/health").json()["models_loaded"]
            assert "test/forever" in loaded
            assert next(lines).startswith("data: ")


def test_a_test_kit_server_starts_and_answers_without_deprecation_warnings(home):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with serve([EchoBackend], home=home, models=[echo_manifest()]) as server:
            for path in ("/v1/chat/completions", "/v1/embeddings"):
                body = {"model": "test/echo", "messages": USER} if "chat" in path else {
                    "model": "test/echo", "input": "hi"}
                assert post(server, path, body).status_code == 200
            assert httpx.get(server.base_url + "/v1/models/test/echo", timeout=10).status_code == 200
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecations == []


@pytest.mark.parametrize("field", ["repeat_penalty", "repetition_penalty"])
def test_a_zero_repeat_penalty_is_refused_once_at_the_edge(server, field):
    err = assert_error(post(server, "/v1/chat/completions",
                            {"model": "test/echo", "messages": USER, field: 0}), 400)
    assert err["param"] == field  # the field the client sent (the decoder refuses it)
    assert post(server, "/v1/chat/completions", {"model": "test/echo", "messages": USER, field: 1.3}).status_code == 200
