"""The bounded queue per model: beyond it, a quick 503 with Retry-After; memory stays flat.

A model runs ``parallel`` requests at once and lets ``queue_size`` more wait. The next
one is refused at once (no waiting, no model work) with 503, ``Retry-After`` and the
OpenAI error shape; the refused flood costs no memory or threads; the waiting requests
are all served afterwards (nothing lost).
"""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import psutil

import relkit
from nexa.testing import EchoBackend, echo_manifest, serve

MODEL = "test/echo"
WORDS = " ".join(f"w{i}" for i in range(3000))  # minutes of output at the delays below


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_full_queue_is_a_quick_503_with_retry_after_and_memory_stays_flat(home):
    with serve([EchoBackend], home=home, queue_size=4,
               models=[echo_manifest(MODEL, delay=0.05, context_length=10_000)]) as server:
        base = server.base_url
        manager = server.app.state.manager
        # Two long streams hold both slots (the echo double runs 2 at once).
        holders = [relkit.open_request(base, "/v1/chat/completions", {
            "model": MODEL, "stream": True, "messages": [{"role": "user", "content": WORDS}]}) for _ in range(2)]
        for sock in holders:
            relkit.read_until(sock, b"data: ")
        entry = manager.loaded()[0]
        _wait(lambda: entry.active == 2)

        # Four more wait in the queue.
        results: list[httpx.Response] = []

        def queued(i: int) -> None:
            results.append(httpx.post(base + "/v1/chat/completions", timeout=120, json={
                "model": MODEL, "messages": [{"role": "user", "content": f"queued {i}"}]}))

        waiters = [threading.Thread(target=queued, args=(i,)) for i in range(4)]
        for t in waiters:
            t.start()
        _wait(lambda: entry.waiting == 4)

        body = {"model": MODEL, "messages": [{"role": "user", "content": "one more"}]}
        with httpx.Client(base_url=base, timeout=10) as client:
            client.post("/v1/chat/completions", json=body)  # warm the connection
            latencies = []
            for _ in range(30):
                started = time.perf_counter()
                r = client.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - started)
                relkit.assert_error(r, 503, "server_busy")
                assert int(r.headers["retry-after"]) >= 1
            # A flood of refusals costs no memory and no threads.
            process = psutil.Process()
            rss_before, threads_before = process.memory_info().rss, threading.active_count()
            for _ in range(1000):
                assert client.post("/v1/chat/completions", json=body).status_code == 503
            growth = process.memory_info().rss - rss_before
            assert growth < 16 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB over 1000 refusals"
            assert threading.active_count() <= threads_before + 1
        assert entry.waiting == 4 and entry.active == 2, "refusals must not touch the queue"
        median, worst = statistics.median(latencies), max(latencies)
        print(f"\n503 latency: median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms; "
              f"RSS growth over 1000 refusals: {growth / 1e6:.2f} MB")
        assert median < 0.050, f"median 503 latency {median * 1000:.1f} ms"
        assert worst < 0.250, f"worst 503 latency {worst * 1000:.1f} ms"

        # Nothing lost: once the slots free up, every queued request is served.
        for sock in holders:
            relkit.abandon(sock)
        for t in waiters:
            t.join(timeout=120)
        assert sorted(r.json()["choices"][0]["message"]["content"] for r in results) == [
            f"queued {i}" for i in range(4)]
        _wait(lambda: entry.active == 0 and entry.waiting == 0)


def test_queue_size_is_per_model(home):
    """One model's full queue refuses only that model's requests."""
    with serve([EchoBackend], home=home, queue_size=1, parallel=1,
               models=[echo_manifest("test/a", delay=0.05, context_length=10_000), echo_manifest("test/b")]) as server:
        base = server.base_url
        holder = relkit.open_request(base, "/v1/chat/completions", {
            "model": "test/a", "stream": True, "messages": [{"role": "user", "content": WORDS}]})
        relkit.read_until(holder, b"data: ")
        waiter = relkit.open_request(base, "/v1/chat/completions", {
            "model": "test/a", "messages": [{"role": "user", "content": "wait"}]})
        entry = next(e for e in server.app.state.manager.loaded() if e.manifest.name == "test/a")
        _wait(lambda: entry.waiting == 1)
        r = httpx.post(base + "/v1/chat/completions", timeout=10,
                       json={"model": "test/a", "messages": [{"role": "user", "content": "x"}]})
        relkit.assert_error(r, 503, "server_busy")
        r = httpx.post(base + "/v1/chat/completions", timeout=10,
                       json={"model": "test/b", "messages": [{"role": "user", "content": "fine"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
        relkit.abandon(holder)
        relkit.abandon(waiter)
