"""Clients that go away: the slot is free within about one token + 250 ms.

A client that disconnects mid-stream, while its prompt is being processed (before the
first token), or while it waits in the queue, must not keep a slot or a queue place, and
its work must stop. After 50 such aborts a new request is served at once. The echo test
double paces its tokens (``delay``), so "one token" is known; the SmolLM2 versions show
the same through the llama.cpp plugin.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

import relkit
from nexa.testing import EchoBackend, echo_manifest, serve

MODEL = "test/echo"
TOKEN = 0.05  # seconds per echo token
LONG = " ".join(f"w{i}" for i in range(2000))  # ~100 s of output: never finishes by itself
SLACK = 0.25


def _chat(text, stream):
    return {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": text}]}


def _freed_within(predicate, timeout=10.0) -> float:
    """Seconds until ``predicate()`` holds (fails the test after ``timeout``)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "never freed"
        time.sleep(0.002)
    return time.monotonic() - started


@pytest.fixture
def server(home):
    with serve([EchoBackend], home=home, parallel=1, queue_size=8,
               models=[echo_manifest(MODEL, delay=TOKEN, context_length=100_000)]) as handle:
        yield handle


def _entry(server):
    entries = server.app.state.manager.loaded()
    return entries[0] if entries else None


def _busy(server) -> bool:
    entry = _entry(server)
    return entry is not None and (entry.active > 0 or entry.waiting > 0)


def abort_mid_stream(server) -> float:
    sock = relkit.open_request(server.base_url, "/v1/chat/completions", _chat(LONG, True))
    relkit.read_until(sock, b'"content":" w2"')  # a few tokens in
    relkit.abandon(sock)
    return _freed_within(lambda: not _busy(server))


def abort_before_first_token(server, stream: bool) -> float:
    # The echo double sleeps one token before its first word: "prompt processing".
    sock = relkit.open_request(server.base_url, "/v1/chat/completions", _chat(LONG, stream))
    _freed_within(lambda: _entry(server) is not None and _entry(server).active == 1)
    relkit.abandon(sock)
    return _freed_within(lambda: not _busy(server))


def abort_while_queued(server) -> float:
    holder = relkit.open_request(server.base_url, "/v1/chat/completions", _chat(LONG, True))
    relkit.read_until(holder, b"data: ")
    queued = relkit.open_request(server.base_url, "/v1/chat/completions", _chat("never run", False))
    _freed_within(lambda: _entry(server).waiting == 1)
    relkit.abandon(queued)
    freed = _freed_within(lambda: _entry(server).waiting == 0)
    assert _entry(server).active == 1, "the holder keeps its slot"
    relkit.abandon(holder)
    _freed_within(lambda: not _busy(server))
    return freed


def _served_at_once(server) -> float:
    started = time.monotonic()
    r = httpx.post(server.base_url + "/v1/chat/completions", json=_chat("fresh request", False), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fresh request"
    return time.monotonic() - started


def test_disconnect_mid_stream_frees_the_slot(server):
    freed = abort_mid_stream(server)
    assert freed < TOKEN + SLACK, f"slot freed after {freed * 1000:.0f} ms"
    assert _served_at_once(server) < 2 * TOKEN + SLACK


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_before_the_first_token_frees_the_slot(server, stream):
    freed = abort_before_first_token(server, stream)
    assert freed < TOKEN + SLACK, f"slot freed after {freed * 1000:.0f} ms"


def test_disconnect_while_queued_frees_the_place(server):
    freed = abort_while_queued(server)
    assert freed < SLACK, f"queue place freed after {freed * 1000:.0f} ms"


def test_disconnect_non_stream_mid_answer_stops_the_work(server):
    sock = relkit.open_request(server.base_url, "/v1/chat/completions", _chat(LONG, False))
    _freed_within(lambda: _entry(server) is not None and _entry(server).active == 1)
    time.sleep(5 * TOKEN)  # some tokens produced, nothing sent yet
    relkit.abandon(sock)
    freed = _freed_within(lambda: not _busy(server))
    assert freed < TOKEN + SLACK, f"slot freed after {freed * 1000:.0f} ms"


def test_after_50_aborts_a_new_request_is_served_at_once(server):
    threads_before = threading.active_count()
    worst = 0.0
    kinds = [lambda: abort_mid_stream(server), lambda: abort_before_first_token(server, True),
             lambda: abort_before_first_token(server, False), lambda: abort_while_queued(server)]
    for i in range(50):
        worst = max(worst, kinds[i % len(kinds)]())
    entry = _entry(server)
    assert entry.active == 0 and entry.waiting == 0
    took = _served_at_once(server)
    print(f"\n50 aborts survived; slowest release {worst * 1000:.0f} ms; next request served in {took * 1000:.0f} ms")
    assert worst < TOKEN + SLACK
    assert took < 2 * TOKEN + SLACK  # two words at one token each, plus overhead
    assert threading.active_count() <= threads_before + 2
    health = httpx.get(server.base_url + "/health", timeout=5)
    assert health.status_code == 200


# --- the real model --------------------------------------------------------------------


@pytest.fixture
def smollm2(needs_smollm2, home):
    """SmolLM2 on one slot, warmed up; yields (server, its model entry, seconds per token)."""
    with serve(home=home, load_entry_points=True, parallel=1) as server:
        started = time.monotonic()
        warm = httpx.post(server.base_url + "/v1/chat/completions", timeout=300, json={
            "model": relkit.SMOLLM2, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from one to twenty."}]})
        assert warm.status_code == 200, warm.text
        # An upper bound of one token's time on this machine (it includes the prompt).
        token = (time.monotonic() - started) / max(1, warm.json()["usage"]["completion_tokens"])
        yield server, server.app.state.manager.loaded()[0], max(token, 0.02)


def _next_request_time(server) -> float:
    started = time.monotonic()
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": relkit.SMOLLM2, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    return time.monotonic() - started


@pytest.mark.smollm2
def test_smollm2_disconnect_mid_stream_frees_the_slot(smollm2):
    server, entry, token = smollm2
    story = {"model": relkit.SMOLLM2, "stream": True, "max_tokens": 2000, "temperature": 0.8,
             "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]}
    sock = relkit.open_request(server.base_url, "/v1/chat/completions", story)
    relkit.read_until(sock, b'"content":"', limit=1 << 16)
    time.sleep(0.3)
    relkit.abandon(sock)
    freed = _freed_within(lambda: entry.active == 0 and entry.waiting == 0)
    took = _next_request_time(server)
    print(f"\nSmolLM2 mid-stream: slot freed in {freed * 1000:.0f} ms (token {token * 1000:.0f} ms); "
          f"next request {took:.2f} s")
    assert freed < token + SLACK
    # Far less than the 2000 tokens the abandoned story asked for: its work stopped. (A
    # shared CPU makes the exact figure noisy; the bound is generous on purpose.)
    assert took < max(10.0, 40 * token)


@pytest.mark.smollm2
def test_smollm2_disconnect_during_prompt_processing_frees_the_slot(smollm2):
    server, entry, token = smollm2
    # A fresh prompt (no cached prefix) of ~800 tokens: seconds of prompt processing.
    nonce = f"{time.time_ns()} "
    long_prompt = {"model": relkit.SMOLLM2, "stream": True, "max_tokens": 8,
                   "messages": [{"role": "user", "content": nonce + "Summarise: " + "the sea is calm. " * 160}]}
    sock = relkit.open_request(server.base_url, "/v1/chat/completions", long_prompt)
    _freed_within(lambda: entry.active == 1)
    time.sleep(0.3)
    relkit.abandon(sock)
    freed = _freed_within(lambda: entry.active == 0 and entry.waiting == 0, timeout=600)
    print(f"\nSmolLM2 during prompt processing: slot freed in {freed * 1000:.0f} ms (token {token * 1000:.0f} ms)")
    assert freed < token + SLACK
