"""Model management over HTTP (``/v1/admin``): the resident list, load, unload (waiting
for or cancelling requests), pin, per-request keep_alive, and who may manage at all.

The backends are declared test doubles: ``GatedBackend`` answers "first", then waits at a
gate the test opens (or until its request is cancelled), so a test can hold a request in
flight and see what an unload does to it.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from nexa.backend import Backend
from nexa.errors import Cancelled
from nexa.testing import EchoBackend, echo_manifest, serve
from nexa.testing import wait_until as until
from nexa.types import ChatChunk, EmbedResult, Manifest, ModelFile, Task, Usage

USER = [{"role": "user", "content": "hello there"}]


class GatedBackend(Backend):
    """Test double: a chat sends "first", waits at ``gate`` (or for its cancellation), then
    " second"; an embedding waits the same way. Counts loads, closes and cancellations."""

    name = "gated"
    tasks = frozenset({Task.CHAT, Task.EMBED})
    formats = frozenset({"gated"})
    parallel = 1
    honours_context_length = True
    gate = threading.Event()
    entered = threading.Event()
    cancelled = 0
    loads = 0
    closes = 0

    @classmethod
    def reset(cls) -> None:
        cls.gate.clear()
        cls.entered.clear()
        cls.cancelled = cls.loads = cls.closes = 0

    def load(self) -> None:
        GatedBackend.loads += 1

    def close(self) -> None:
        GatedBackend.closes += 1

    def _wait(self, cancel) -> bool:
        GatedBackend.entered.set()
        while not GatedBackend.gate.wait(0.01):
            if cancel.cancelled:
                GatedBackend.cancelled += 1
                return False
        return True

    def chat(self, request, cancel):
        yield ChatChunk(content="first")
        if not self._wait(cancel):
            return
        yield ChatChunk(content=" second")
        yield ChatChunk(finish_reason="stop", usage=Usage(2, 2))

    def complete(self, request, cancel):
        yield from self.chat(request, cancel)

    def embed(self, request, cancel):
        if not self._wait(cancel):
            raise Cancelled()
        return EmbedResult(tuple((1.0, 0.0) for _ in request.inputs), len(request.inputs))


def gated(name: str = "test/gated", size: int = 1000) -> Manifest:
    return Manifest(name=name, format="gated", tasks={Task.CHAT, Task.EMBED}, context_length=4096,
                    files=[ModelFile("weights.bin", size)])


class SizedEcho(EchoBackend):
    """The echo double with a file size, for the memory budget (LRU) tests."""

    name = "sized"
    formats = frozenset({"sized"})


def sized(name: str, size: int = 600) -> Manifest:
    return Manifest(name=name, format="sized", tasks={Task.CHAT}, files=[ModelFile("w.bin", size)])


@pytest.fixture(autouse=True)
def _reset_gate():
    GatedBackend.reset()
    yield
    GatedBackend.gate.set()  # never leave a worker thread waiting


def post(handle, path, body, **kw):
    return httpx.post(handle.base_url + path, json=body, timeout=30, **kw)


def resident(handle, **kw) -> dict[str, dict]:
    resp = httpx.get(handle.base_url + "/v1/admin/models", timeout=30, **kw)
    assert resp.status_code == 200, resp.text
    return {e["model"]: e for e in resp.json()["data"]}


def error_of(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# --- the listing ---------------------------------------------------------------------


def test_resident_listing_describes_each_loaded_model(home):
    with serve([GatedBackend, EchoBackend], home=home, models=[gated(), echo_manifest()]) as handle:
        assert resident(handle) == {}
        assert post(handle, "/v1/chat/completions", {"model": "test/echo", "messages": USER}).status_code == 200
        entry = resident(handle)["test/echo"]
        assert entry["backend"] == "echo" and entry["device"] == handle.app.state.manager.device.kind
        assert entry["state"] == "ready"
        assert (entry["slots_busy"], entry["slots_total"], entry["queued"]) == (0, 2, 0)
        assert entry["weights_bytes"] == 0 and entry["kv_cache_bytes"] is None and entry["context"] == 256
        assert entry["keep_alive"] == 300 and 0 < entry["expires_in"] <= 300 and entry["pinned"] is False

        GatedBackend.gate.clear()
        thread = threading.Thread(target=post, args=(handle, "/v1/chat/completions",
                                                     {"model": "test/gated", "messages": USER}))
        thread.start()
        assert GatedBackend.entered.wait(20)
        busy = resident(handle)["test/gated"]
        # In use: a busy slot, and no keep-alive countdown while it runs.
        assert (busy["slots_busy"], busy["slots_total"], busy["expires_in"]) == (1, 1, None)
        assert busy["weights_bytes"] == 1000 and busy["context"] == 4096
        GatedBackend.gate.set()
        thread.join(30)
        assert resident(handle)["test/gated"]["slots_busy"] == 0


def test_unknown_or_unloaded_models_are_404(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()]) as handle:
        for path, body in (("load", {"model": "nope/missing"}), ("unload", {"model": "nope/missing"}),
                           ("pin", {"model": "nope/missing"})):
            error = error_of(post(handle, f"/v1/admin/models/{path}", body), 404, "model_not_found")
            assert error["param"] == "model"
        for path in ("unload", "pin"):
            error = error_of(post(handle, f"/v1/admin/models/{path}", {"model": "test/echo"}), 404, "model_not_loaded")
            assert "not loaded" in error["message"]


def test_management_bodies_are_checked(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()]) as handle:
        error = error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo", "ctx": 512}), 400)
        assert "ctx" in error["message"]
        error_of(post(handle, "/v1/admin/models/unload", {"model": "test/echo", "mode": "later"}), 400)
        error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo", "keep_alive": "soon"}), 400)
        # The echo double sizes no context: asking it for one is refused, not ignored.
        error = error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo", "context": 512}), 400)
        assert error["param"] == "context"
        assert resident(handle) == {}


def test_management_bodies_are_decoded_strictly_and_guarded_like_every_route(home):
    """The app's strict decoder and its cross-site/Content-Type guard cover /v1/admin too:
    a management call from another site's page, or as a form, changes nothing."""
    with serve([EchoBackend], home=home, models=[echo_manifest()]) as handle:
        url = handle.base_url + "/v1/admin/models/load"
        error = error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo", "parallel": "2"}), 400,
                         "invalid_type")
        assert error["param"] == "parallel"
        error = error_of(post(handle, "/v1/admin/models/pin", {"model": "test/echo", "pinned": 1}), 400,
                         "invalid_type")
        assert error["param"] == "pinned"
        error = error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo\n"}), 400)
        assert error["param"] == "model"
        error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo", "keep_alive": [1]}), 400)
        error_of(httpx.post(url, content=b'{"model": "test/echo"', headers={"Content-Type": "application/json"},
                            timeout=30), 400, "invalid_json")
        # A text/plain POST is what another site's page may send without asking the browser.
        error = error_of(httpx.post(url, content=json.dumps({"model": "test/echo"}),
                                    headers={"Content-Type": "text/plain"}, timeout=30), 415)
        assert error["param"] == "Content-Type"
        error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo"},
                      headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}), 403,
                 "cross_site_request")
        error_of(post(handle, "/v1/admin/pull", {"model": "org/repo"},
                      headers={"Origin": "http://evil.example"}), 403, "cross_site_request")
        assert resident(handle) == {}
        # The same call from the server's own page (same origin) goes through.
        origin = handle.base_url
        resp = post(handle, "/v1/admin/models/load", {"model": "test/echo"},
                    headers={"Origin": origin, "Sec-Fetch-Site": "same-origin"})
        assert resp.status_code == 200, resp.text
        assert set(resident(handle)) == {"test/echo"}


# --- load ------------------------------------------------------------------------------


def test_load_with_context_parallel_and_keep_alive(home):
    with serve([GatedBackend], home=home, models=[gated()]) as handle:
        resp = post(handle, "/v1/admin/models/load",
                    {"model": "test/gated", "context": 512, "parallel": 3, "keep_alive": "10m"})
        assert resp.status_code == 200, resp.text
        entry = resp.json()
        assert (entry["model"], entry["state"], entry["context"], entry["slots_total"]) == ("test/gated", "ready", 512, 3)
        assert entry["keep_alive"] == 600
        assert resident(handle)["test/gated"]["slots_total"] == 3
        assert GatedBackend.loads == 1
        # Loading it again with the same settings is a no-op; with others, a conflict.
        assert post(handle, "/v1/admin/models/load", {"model": "test/gated", "context": 512}).status_code == 200
        error = error_of(post(handle, "/v1/admin/models/load", {"model": "test/gated", "context": 1024}), 409, "conflict")
        assert error["param"] == "context" and "512" in error["message"]
        error_of(post(handle, "/v1/admin/models/load", {"model": "test/gated", "parallel": 1}), 409)
        assert GatedBackend.loads == 1
        # A request then runs on the loaded model (no second load).
        GatedBackend.gate.set()
        assert post(handle, "/v1/embeddings", {"model": "test/gated", "input": "x"}).status_code == 200
        assert GatedBackend.loads == 1


def test_a_parallel_the_backend_cannot_run_is_refused(home):
    class OneAtATime(GatedBackend):
        name = "one-at-a-time"

        def __init__(self, manifest, device, options=None):
            import attrs

            super().__init__(manifest, device, attrs.evolve(options, parallel=1) if options else None)

    with serve([OneAtATime], home=home, models=[gated()]) as handle:
        error = error_of(post(handle, "/v1/admin/models/load", {"model": "test/gated", "parallel": 4}), 400)
        assert error["param"] == "parallel" and "runs 1" in error["message"]
        assert resident(handle) == {}


# --- unload ------------------------------------------------------------------------------


def _stream_lines(handle, body):
    """A streamed chat as (response, line iterator), first content already received."""
    client = httpx.Client(base_url=handle.base_url, timeout=60)
    cm = client.stream("POST", "/v1/chat/completions", json={**body, "stream": True})
    resp = cm.__enter__()
    assert resp.status_code == 200
    lines = (line for line in resp.iter_lines() if line.startswith("data: "))
    role = json.loads(next(lines)[6:])["choices"][0]["delta"]
    assert role == {"role": "assistant", "content": ""}
    assert json.loads(next(lines)[6:])["choices"][0]["delta"]["content"] == "first"
    return client, cm, lines


def test_unload_waits_for_a_busy_model_then_reloads_for_new_requests(home):
    with serve([GatedBackend], home=home, models=[gated()]) as handle:
        client, cm, lines = _stream_lines(handle, {"model": "test/gated", "messages": USER})
        result = {}
        unloader = threading.Thread(target=lambda: result.update(
            r=post(handle, "/v1/admin/models/unload", {"model": "test/gated", "mode": "wait"})))
        unloader.start()
        until(lambda: resident(handle)["test/gated"]["state"] == "unloading", "the model to be marked unloading")
        assert unloader.is_alive(), "unload returned while a request was still running"
        assert GatedBackend.closes == 0
        # A new request meanwhile waits for the unload, then loads the model anew.
        later = {}
        newcomer = threading.Thread(target=lambda: later.update(
            r=post(handle, "/v1/embeddings", {"model": "test/gated", "input": "x"})))
        newcomer.start()
        GatedBackend.gate.set()
        rest = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
        cm.__exit__(None, None, None)
        client.close()
        unloader.join(30)
        newcomer.join(30)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in rest) == " second"
        assert rest[-1]["choices"][0]["finish_reason"] == "stop"
        assert result["r"].status_code == 200
        assert result["r"].json() == {"model": "test/gated", "unloaded": True, "cancelled": 0}
        assert later["r"].status_code == 200
        assert (GatedBackend.loads, GatedBackend.closes, GatedBackend.cancelled) == (2, 1, 0)


def test_unload_cancel_stops_running_and_queued_requests(home):
    with serve([GatedBackend], home=home, models=[gated()]) as handle:
        async def scenario():
            async with httpx.AsyncClient(base_url=handle.base_url, timeout=60) as c:
                running = asyncio.create_task(c.post("/v1/chat/completions", json={"model": "test/gated", "messages": USER}))
                await asyncio.to_thread(GatedBackend.entered.wait, 20)
                queued = asyncio.create_task(c.post("/v1/embeddings", json={"model": "test/gated", "input": "x"}))
                await asyncio.to_thread(until, lambda: resident(handle)["test/gated"]["queued"] == 1, "a queued request")
                unload = await c.post("/v1/admin/models/unload", json={"model": "test/gated", "mode": "cancel"})
                return unload, await running, await queued

        unload, running, queued = asyncio.run(scenario())
        assert unload.status_code == 200 and unload.json()["cancelled"] == 2
        for resp in (running, queued):
            error = error_of(resp, 503, "model_unloaded")
            assert "unloaded" in error["message"]
        # The backend's work really stopped, and the model is gone.
        assert GatedBackend.cancelled == 1 and GatedBackend.closes == 1
        assert resident(handle) == {}


def test_unload_cancel_ends_a_stream_with_an_error_event(home):
    with serve([GatedBackend], home=home, models=[gated()]) as handle:
        client, cm, lines = _stream_lines(handle, {"model": "test/gated", "messages": USER})
        unload = post(handle, "/v1/admin/models/unload", {"model": "test/gated", "mode": "cancel"})
        assert unload.status_code == 200 and unload.json()["cancelled"] == 1
        events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
        cm.__exit__(None, None, None)
        client.close()
        assert events[-1]["error"]["code"] == "model_unloaded"
        assert GatedBackend.cancelled == 1 and GatedBackend.closes == 1
        assert resident(handle) == {}


def test_unload_cancel_ends_a_text_completion(home):
    """/v1/completions (a streamed one, and a whole one) as chat: an error, not a hang."""
    with serve([GatedBackend], home=home, models=[gated()]) as handle:
        body = {"model": "test/gated", "prompt": "hello", "stream": True}
        with httpx.Client(base_url=handle.base_url, timeout=60) as client, \
                client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = (line for line in resp.iter_lines() if line.startswith("data: "))
            assert json.loads(next(lines)[6:])["choices"][0]["text"] == "first"
            unload = post(handle, "/v1/admin/models/unload", {"model": "test/gated", "mode": "cancel"})
            rest = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
        assert unload.status_code == 200 and unload.json()["cancelled"] == 1
        assert rest[-1]["error"]["code"] == "model_unloaded"
        assert GatedBackend.cancelled == 1 and resident(handle) == {}

        GatedBackend.reset()
        result = {}
        waiter = threading.Thread(target=lambda: result.update(
            r=post(handle, "/v1/completions", {"model": "test/gated", "prompt": "hello"})))
        waiter.start()
        assert GatedBackend.entered.wait(20)
        unload = post(handle, "/v1/admin/models/unload", {"model": "test/gated", "mode": "cancel"})
        waiter.join(30)
        assert unload.json()["cancelled"] == 1
        error_of(result["r"], 503, "model_unloaded")
        assert GatedBackend.cancelled == 1 and resident(handle) == {}


def test_unload_cancel_ends_an_anthropic_messages_stream(home):
    with serve([GatedBackend], home=home, models=[gated()]) as handle:
        body = {"model": "test/gated", "max_tokens": 16, "stream": True, "messages": USER}
        with httpx.Client(base_url=handle.base_url, timeout=60) as client, \
                client.stream("POST", "/v1/messages", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: ") and "first" in line:
                    break
            unload = post(handle, "/v1/admin/models/unload", {"model": "test/gated", "mode": "cancel"})
            rest = list(lines)
        assert unload.status_code == 200 and unload.json()["cancelled"] == 1
        assert "event: error" in rest
        error = json.loads(rest[rest.index("event: error") + 1][6:])["error"]
        assert "unloaded" in error["message"]
        assert GatedBackend.cancelled == 1 and resident(handle) == {}


def test_unload_cancel_stops_an_embedding(home):
    with serve([GatedBackend], home=home, models=[gated()]) as handle:
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            r=post(handle, "/v1/embeddings", {"model": "test/gated", "input": ["a", "b"]})))
        worker.start()
        assert GatedBackend.entered.wait(20)
        assert post(handle, "/v1/admin/models/unload", {"model": "test/gated", "mode": "cancel"}).json()["cancelled"] == 1
        worker.join(30)
        error_of(result["r"], 503, "model_unloaded")
        assert GatedBackend.cancelled == 1 and resident(handle) == {}


# --- pin and keep-alive -------------------------------------------------------------------


def test_pin_beats_lru_eviction(home):
    models = [sized("test/a"), sized("test/b"), sized("test/c")]
    with serve([SizedEcho], home=home, models=models, memory_budget=1000) as handle:
        assert post(handle, "/v1/chat/completions", {"model": "test/a", "messages": USER}).status_code == 200
        pinned = post(handle, "/v1/admin/models/pin", {"model": "test/a", "pinned": True})
        assert pinned.status_code == 200 and pinned.json()["pinned"] is True
        # b does not fit beside a, but a is pinned: it stays, b loads beside it.
        assert post(handle, "/v1/chat/completions", {"model": "test/b", "messages": USER}).status_code == 200
        assert set(resident(handle)) == {"test/a", "test/b"}
        # c needs room: b (unpinned) goes, although a was used longer ago.
        assert post(handle, "/v1/chat/completions", {"model": "test/c", "messages": USER}).status_code == 200
        assert set(resident(handle)) == {"test/a", "test/c"}
        assert resident(handle)["test/a"]["pinned"] is True
        # Unpinned, a is evictable again.
        assert post(handle, "/v1/admin/models/pin", {"model": "test/a", "pinned": False}).json()["pinned"] is False
        assert post(handle, "/v1/chat/completions", {"model": "test/b", "messages": USER}).status_code == 200
        assert set(resident(handle)) == {"test/b"}


def test_pin_beats_keep_alive(home):
    with serve([SizedEcho], home=home, models=[sized("test/a", 1), sized("test/b", 1)]) as handle:
        assert post(handle, "/v1/admin/models/load", {"model": "test/a", "keep_alive": -1}).status_code == 200
        assert post(handle, "/v1/admin/models/pin", {"model": "test/a"}).status_code == 200
        # Requests give both models a keep-alive that runs out at once, or almost.
        for name, keep in (("test/a", 0), ("test/a", 0.2), ("test/b", 0.2)):
            chat = {"model": name, "messages": USER, "keep_alive": keep}
            assert post(handle, "/v1/chat/completions", chat).status_code == 200
        until(lambda: "test/b" not in resident(handle), "b's keep-alive to unload it")
        entry = resident(handle)["test/a"]
        assert entry["pinned"] is True and entry["keep_alive"] == 0.2 and entry["expires_in"] is None
        post(handle, "/v1/admin/models/pin", {"model": "test/a", "pinned": False})
        until(lambda: resident(handle) == {}, "a to unload once unpinned")


def test_keep_alive_zero_unloads_after_the_request(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()]) as handle:
        chat = post(handle, "/v1/chat/completions", {"model": "test/echo", "messages": USER, "keep_alive": 0})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "hello there"
        assert resident(handle) == {}
        embed = post(handle, "/v1/embeddings", {"model": "test/echo", "input": "x", "keep_alive": "0s"})
        assert embed.status_code == 200 and resident(handle) == {}
        text = post(handle, "/v1/completions", {"model": "test/echo", "prompt": "hi", "keep_alive": 0})
        assert text.status_code == 200 and text.json()["choices"][0]["text"] == "hi" and resident(handle) == {}
        image = post(handle, "/v1/images/generations", {"model": "test/echo", "prompt": "p", "size": "8x8",
                                                         "response_format": "b64_json", "keep_alive": 0})
        assert image.status_code == 200 and resident(handle) == {}
        # A load with keep_alive 0 (Ollama's way to unload): loaded, then gone once idle.
        loaded = post(handle, "/v1/admin/models/load", {"model": "test/echo", "keep_alive": 0})
        assert loaded.status_code == 200 and loaded.json()["keep_alive"] == 0
        until(lambda: resident(handle) == {}, "the model to unload once idle")
        metrics = httpx.get(handle.base_url + "/metrics").text
        assert 'nexa_model_evictions_total{model="test/echo",reason="keepalive"} 5.0' in metrics


def test_keep_alive_of_a_request_sets_the_models(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()]) as handle:
        post(handle, "/v1/chat/completions", {"model": "test/echo", "messages": USER, "keep_alive": "1h30m"})
        entry = resident(handle)["test/echo"]
        assert entry["keep_alive"] == 5400 and 5000 < entry["expires_in"] <= 5400
        post(handle, "/v1/chat/completions", {"model": "test/echo", "messages": USER, "keep_alive": -1})
        entry = resident(handle)["test/echo"]
        assert entry["keep_alive"] is None and entry["expires_in"] is None
        post(handle, "/v1/chat/completions", {"model": "test/echo", "messages": USER, "keep_alive": 0.2})
        until(lambda: resident(handle) == {}, "the 0.2 s keep-alive to unload the model")
        error = error_of(post(handle, "/v1/chat/completions",
                              {"model": "test/echo", "messages": USER, "keep_alive": "5 minutes"}), 400)
        assert error["param"] == "keep_alive"


# --- who may manage ------------------------------------------------------------------------


def test_management_needs_the_api_key_when_one_is_set(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()], api_key="s3cret") as handle:
        error_of(httpx.get(handle.base_url + "/v1/admin/models"), 401, "invalid_api_key")
        error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo"}), 401)
        error_of(post(handle, "/v1/admin/models/unload", {"model": "test/echo"}), 401)
        assert resident(handle, headers={"Authorization": "Bearer s3cret"}) == {}
        ok = post(handle, "/v1/admin/models/load", {"model": "test/echo"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_management_is_refused_on_a_public_bind_without_a_key(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()], host="0.0.0.0", allow_insecure_bind=True) as handle:
        error = error_of(httpx.get(handle.base_url + "/v1/admin/models"), 403, "forbidden")
        assert "API key" in error["message"]
        error_of(post(handle, "/v1/admin/models/load", {"model": "test/echo"}), 403)
        # Inference itself stays open (the operator chose --insecure for that).
        assert post(handle, "/v1/chat/completions", {"model": "test/echo", "messages": USER}).status_code == 200
    with serve([EchoBackend], home=home, models=[echo_manifest()], host="0.0.0.0", api_key="k") as handle:
        # With a key, a public bind may be managed (by those who hold it).
        loaded = post(handle, "/v1/admin/models/load", {"model": "test/echo"}, headers={"Authorization": "Bearer k"})
        assert loaded.status_code == 200 and loaded.json()["state"] == "ready"


# --- the page ----------------------------------------------------------------------------


def test_the_page_is_served_without_the_key_and_locked_down(home):
    with serve([EchoBackend], home=home, models=[echo_manifest()], api_key="s3cret") as handle:
        page = httpx.get(handle.base_url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/ui/app.js">' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("chat.js", "text/javascript")):
            asset = httpx.get(f"{handle.base_url}/ui/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        for bad in ("/ui/../manager.py", "/ui/%2e%2e%2fapp.js", "/ui/missing.js", "/ui/.hidden.js"):
            assert httpx.get(handle.base_url + bad).status_code == 404, bad
        # The data behind the page still needs the key.
        error_of(httpx.get(handle.base_url + "/v1/models"), 401)
        # And the page is not served to a rebinding host name.
        assert httpx.get(handle.base_url + "/", headers={"Host": "evil.example"}).status_code == 403


def test_every_file_the_page_loads_exists(home):
    import re

    from nexa.server.routes.page import PAGE_DIR

    html = (PAGE_DIR / "index.html").read_text()
    referenced = set(re.findall(r'(?:src|href)="/ui/([^"]+)"', html))
    for script in PAGE_DIR.glob("*.js"):
        referenced |= set(re.findall(r'from "\./([^"]+)"', script.read_text()))
    assert {"app.js", "app.css", "api.js", "chat.js", "images.js", "embeddings.js", "models.js"} <= referenced
    assert all((PAGE_DIR / name).is_file() for name in referenced)
    # No network at run time: nothing outside this server is referenced.
    for path in PAGE_DIR.iterdir():
        assert not re.search(r"https?://", path.read_text()), path.name
