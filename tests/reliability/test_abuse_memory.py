"""Small requests that used to cost seconds and hundreds of MB, on a real ``nexa serve``.

- Embeddings: 512 inputs of 20,000 characters (10 MB, inside the body cap), four times,
  against MiniLM. It was tokenized in full before being refused (18-27 s each, RSS
  1.1 -> 1.8 GB and kept); now the cheap character caps refuse it (413) before any
  tokenizer runs, and RSS stays put. Inputs inside the character caps but past the
  model's window are refused after tokenizing only a prefix of the first.
- Grammars: ``{"type": "string", "minLength": 10000000}`` (a 219-byte request) was
  accepted (a 50 MB grammar, ~5 s, RSS +60 MB a time) and ``"maxLength": 50000``
  crashed the server (llama.cpp's grammar parser overflowed its stack). Now each is a
  400 naming the cap, the server stays up, RSS stays put, and grammars inside the caps
  still constrain SmolLM2's answer.

Figures go to stdout (``-s``) and, with ``NEXA_ABUSE_REPORT=path.json``, to a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

import relkit

MB = 1 << 20
GROWTH_ALLOWED = 64 * MB
"""RSS a server may keep after the abuse runs below (the old figures: +700 MB, +170 MB)."""
REPORT: dict[str, dict] = {}


def _report(name: str, figures: dict) -> None:
    REPORT[name] = figures
    print(f"\n{name}: {json.dumps(figures)}")
    if os.environ.get("NEXA_ABUSE_REPORT"):
        Path(os.environ["NEXA_ABUSE_REPORT"]).write_text(json.dumps(REPORT, indent=1))


@pytest.fixture
def minilm_serve(home):
    reason = relkit.minilm_missing()
    if reason:
        pytest.skip(reason)
    server = relkit.NexaProcess(home, relkit.MINILM, loaded=[relkit.MINILM])
    yield server
    server.stop()


def test_embedding_abuse_is_refused_cheaply_and_keeps_no_memory(minilm_serve):
    client = httpx.Client(base_url=minilm_serve.base, timeout=600)
    assert client.post("/v1/embeddings", json={"model": relkit.MINILM, "input": ["warm up"]}).status_code == 200
    before = minilm_serve.rss()
    abuse = {"model": relkit.MINILM, "input": ["word " * 4000] * 512}
    for _ in range(4):
        err = relkit.assert_error(client.post("/v1/embeddings", json=abuse), 413, "payload_too_large")
        assert "max_embed_total_chars" in err["message"]
    after_abuse = minilm_serve.rss()
    # Inside the character caps (1,000,000) but every input past MiniLM's 256-token window.
    for _ in range(4):
        relkit.assert_error(client.post("/v1/embeddings", json={"model": relkit.MINILM,
                                                               "input": ["word " * 4000] * 50}),
                            400, "context_length_exceeded")
    after = minilm_serve.rss()
    ok = client.post("/v1/embeddings", json={"model": relkit.MINILM, "input": ["still here", "and well"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    _report("embedding abuse", {"requests": 8, "rss_before_mb": round(before / MB, 1),
                                "rss_after_4x_512x20000_mb": round(after_abuse / MB, 1),
                                "rss_after_4x_50x20000_mb": round(after / MB, 1)})
    assert after - before < GROWTH_ALLOWED, (before, after_abuse, after)


@pytest.fixture
def smollm2_serve(needs_smollm2, home):
    server = relkit.NexaProcess(home, relkit.SMOLLM2, "--threads", "1", loaded=[relkit.SMOLLM2])
    yield server
    server.stop()


ABUSIVE_SCHEMAS = [
    ({"type": "string", "minLength": 10_000_000}, "max_schema_repeat"),
    ({"type": "string", "maxLength": 50_000}, "max_schema_repeat"),  # crashed llama.cpp
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 1_000_000}, "max_schema_repeat"),
    ({"type": "string", "pattern": "^a{1000000}$"}, "max_schema_repeat"),
    ({"type": "string", "pattern": "^(a{999}){999}$"}, "max_grammar_size"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(60)}},
     "max_grammar_size"),
]


def _chat(schema=None, tool_parameters=None) -> dict:
    body = {"model": relkit.SMOLLM2, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "Give me a JSON answer about the sea."}]}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    if tool_parameters is not None:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": tool_parameters}}]
        body["tool_choice"] = {"type": "function", "function": {"name": "f"}}
    return body


@pytest.mark.smollm2
def test_grammar_abuse_is_refused_and_keeps_no_memory(smollm2_serve):
    client = httpx.Client(base_url=smollm2_serve.base, timeout=600)
    assert client.post("/v1/chat/completions", json=_chat()).status_code == 200
    before = smollm2_serve.rss()
    sent = 0
    for _ in range(3):
        for schema, cap in ABUSIVE_SCHEMAS:
            for body in (_chat(schema=schema), _chat(tool_parameters=schema)):
                err = relkit.assert_error(client.post("/v1/chat/completions", json=body), 400, "schema_too_large")
                assert cap in err["message"], err
                sent += 1
    assert smollm2_serve.alive()
    after = smollm2_serve.rss()
    # Grammars inside the caps still bind the answer (a string of at most 1000 characters
    # is the largest repetition llama.cpp's parser takes).
    schema = {"type": "object", "properties": {"sea": {"type": "string", "maxLength": 1000}}, "required": ["sea"]}
    r = client.post("/v1/chat/completions", json={**_chat(schema=schema), "max_tokens": 64})
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(answer)["sea"], str)
    else:
        assert answer.lstrip().startswith("{"), answer
    _report("grammar abuse", {"requests": sent, "rss_before_mb": round(before / MB, 1),
                              "rss_after_mb": round(after / MB, 1), "server_alive": smollm2_serve.alive()})
    assert after - before < GROWTH_ALLOWED, (before, after)
