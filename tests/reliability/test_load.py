"""Overload: 16 concurrent clients, mixed requests, the real SmolLM2 model.

Each client sends ``NEXA_LOAD_REQUESTS`` requests (default 20; the ``load`` nox session
runs 200; ``NEXA_LOAD_THREADS`` sets decode threads) in turn: chat without streaming, chat streaming, and embeddings (MiniLM through
the sentence-transformers plugin when it is installed; the llama.cpp plugin serves no
embeddings from a chat model). Zero requests may fail apart from deliberate 503s (a full
queue); every answer must be complete and well-formed (usage adds up, streams end with
one finish_reason and ``[DONE]``, one normalised vector per input). Figures go to stdout
and, with ``NEXA_LOAD_REPORT=path.json``, to a file.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

import relkit
from nexa.testing import serve

CLIENTS = 16
REQUESTS = int(os.environ.get("NEXA_LOAD_REQUESTS", "20"))
# Decode threads per model (``nexa serve --threads``); unset: the plugin's default.
THREADS = int(os.environ["NEXA_LOAD_THREADS"]) if os.environ.get("NEXA_LOAD_THREADS") else None
pytestmark = [pytest.mark.load, pytest.mark.smollm2]

PROMPTS = ["Name a colour.", "What is 2 + 2?", "Say hello.", "Name a fruit.", "What day comes after Monday?",
           "Give me one word for happy.", "Name an animal.", "What is the capital of France?"]
TEXTS = ["the cat sat on the mat", "a lighthouse by the sea", "quantum chromodynamics", "fresh bread in the morning"]


def _chat(client, i, stream):
    body = {"model": relkit.SMOLLM2, "max_tokens": 16, "temperature": 0.7, "seed": i, "stream": stream,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            text = r.read().decode()
            if r.status_code != 200:
                return r.status_code, r.headers, text
        events = relkit.parse_sse(text)
        content = relkit.check_chat_stream(text)
        assert "\ufffd" not in content, f"broken UTF-8 in {content!r}"
        usage = events[-1]["usage"]
        assert events[-1]["choices"] == [] and usage["completion_tokens"] <= 16
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, r.headers, text
    r = client.post("/v1/chat/completions", json=body)
    if r.status_code == 200:
        text = relkit.check_chat_completion(r.json())
        assert r.json()["usage"]["completion_tokens"] <= 16
        assert "\ufffd" not in text, f"broken UTF-8 in {text!r}"
    return r.status_code, r.headers, r.text


def _embed(client, i, model):
    inputs = [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)]
    r = client.post("/v1/embeddings", json={"model": model, "input": inputs})
    if r.status_code == 200:
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(len(inputs)))
        for d in data:
            assert len(d["embedding"]) == 384
            assert abs(math.sqrt(sum(v * v for v in d["embedding"])) - 1) < 1e-3
        assert r.json()["usage"]["prompt_tokens"] > 0
    return r.status_code, r.headers, r.text


def test_load_mixed_requests_on_smollm2(needs_smollm2, home):
    embed_model = relkit.MINILM if relkit.minilm_missing() is None else None
    kinds = ["chat", "chat-stream"] + (["embeddings"] if embed_model else [])
    results: dict[str, list[float]] = collections.defaultdict(list)
    busy = collections.Counter()
    failures: list[str] = []
    lock = threading.Lock()

    with serve(home=home, load_entry_points=True, threads=THREADS) as server:
        process = psutil.Process()
        with httpx.Client(base_url=server.base_url, timeout=600) as warm:  # load both models first
            assert _chat(warm, 0, False)[0] == 200
            if embed_model:
                assert _embed(warm, 0, embed_model)[0] == 200
        rss_before = process.memory_info().rss

        def client_loop(c: int) -> None:
            with httpx.Client(base_url=server.base_url, timeout=600) as client:
                for n in range(REQUESTS):
                    i = c * REQUESTS + n
                    kind = kinds[i % len(kinds)]
                    started = time.monotonic()
                    try:
                        if kind == "embeddings":
                            status, headers, text = _embed(client, i, embed_model)
                        else:
                            status, headers, text = _chat(client, i, kind == "chat-stream")
                        took = time.monotonic() - started
                        if status == 503:
                            # Deliberate: a full queue. It must say when to come back.
                            relkit.check_error_body(json.loads(text))
                            assert int(headers["retry-after"]) >= 1
                            with lock:
                                busy[kind] += 1
                            continue
                        assert status == 200, f"{status}: {text[:300]}"
                        with lock:
                            results[kind].append(took)
                    except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                        with lock:
                            failures.append(f"{kind} #{i}: {type(exc).__name__}: {str(exc)[:300]}")

        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client_loop, range(CLIENTS)))
        wall = time.monotonic() - started
        rss_after = process.memory_info().rss
        manager = server.app.state.manager
        assert all(e.active == 0 and e.waiting == 0 for e in manager.loaded())
        health = httpx.get(server.base_url + "/health", timeout=30)
        assert health.status_code == 200

    served = sum(len(v) for v in results.values())
    report = {
        "clients": CLIENTS,
        "requests_per_client": REQUESTS,
        "sent": CLIENTS * REQUESTS,
        "served": served,
        "deliberate_503": sum(busy.values()),
        "failed": len(failures),
        "embedding_model": embed_model,
        "threads": THREADS or "plugin default",
        "wall_seconds": round(wall, 1),
        "requests_per_second": round(served / wall, 2),
        "latency_seconds": {k: {"p50": round(statistics.median(v), 3),
                                "p95": round(sorted(v)[int(len(v) * 0.95) - 1], 3), "n": len(v)}
                            for k, v in sorted(results.items()) if v},
        "rss_growth_mb": round((rss_after - rss_before) / 1e6, 1),
    }
    print("\nload: " + json.dumps(report))
    if os.environ.get("NEXA_LOAD_REPORT"):
        Path(os.environ["NEXA_LOAD_REPORT"]).write_text(json.dumps(report, indent=1))
    assert failures == [], "\n".join(failures[:20])
    assert served + report["deliberate_503"] == CLIENTS * REQUESTS
    assert served > 0
