"""Error messages never show absolute paths or tracebacks to clients.

Backends and libraries put file paths into their exceptions (llama.cpp names the file it
could not load). Whatever a backend raises, a domain error or a plain exception, before
or during a stream, the client sees the OpenAI error shape with at most a file's last
name; the full story goes to the server log only.
"""

from __future__ import annotations

import json

import attrs
import httpx
import pytest

import relkit
from nexa.errors import BadRequest, ModelLoadError
from nexa.server.errors import scrub
from nexa.testing import EchoBackend, echo_manifest, serve
from nexa.types import ChatChunk

SECRET = "/srv/private/owner-name/models/acme/secret-weights.gguf"


class LeakyBackend(EchoBackend):
    """The echo double, raising what careless backends raise."""

    name = "leaky"
    formats = frozenset({"leaky"})

    def load(self) -> None:
        how = self.manifest.options.get("load")
        if how == "nexa":
            raise ModelLoadError(f"could not load {SECRET}: bad magic")
        if how == "plain":
            raise FileNotFoundError(2, "No such file or directory", SECRET)

    def chat(self, request, cancel):
        how = self.manifest.options.get("chat")
        if how == "late":
            yield ChatChunk(content="partial answer")
        if how in ("plain", "late"):
            raise RuntimeError(f"decode failed for {SECRET} (see C:\\Users\\owner\\model.gguf)")
        if how == "nexa":
            raise BadRequest(f"template error in {SECRET}")
        yield from super().chat(request, cancel)


def _manifest(name, **options):
    return attrs.evolve(echo_manifest(name), format="leaky", options=options)


@pytest.fixture
def server(home):
    models = [_manifest("leak/load-nexa", load="nexa"), _manifest("leak/load-plain", load="plain"),
              _manifest("leak/chat-plain", chat="plain"), _manifest("leak/chat-nexa", chat="nexa"),
              _manifest("leak/chat-late", chat="late")]
    with serve([LeakyBackend], home=home, models=models) as handle:
        yield handle


def _ask(server, model, stream=False):
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=30, json={
        "model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("model,status", [("leak/load-nexa", 500), ("leak/load-plain", 500),
                                          ("leak/chat-plain", 500), ("leak/chat-nexa", 400)])
@pytest.mark.parametrize("stream", [False, True])
def test_errors_show_no_paths_or_tracebacks(server, model, status, stream):
    r = _ask(server, model, stream)
    relkit.assert_error(r, status, None, SECRET, "/srv/private", "owner-name", "C:\\Users")
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_error_during_a_stream_is_an_event_without_paths(server):
    r = _ask(server, "leak/chat-late", stream=True)
    assert r.status_code == 200
    events = relkit.parse_sse(r.text)
    assert events[-1]["error"]
    relkit.check_error_body(events[-1], SECRET, "/srv/private", "owner-name", "C:\\Users")
    assert "owner" not in r.text and "Traceback" not in r.text


def test_server_log_keeps_the_detail(server, caplog):
    _ask(server, "leak/chat-plain")
    assert SECRET in caplog.text  # the operator still learns which file


@pytest.mark.parametrize("text,expected", [
    (f"could not load {SECRET}: bad magic", "could not load secret-weights.gguf: bad magic"),
    ("[Errno 2] No such file or directory: '/home/u/.cache/nexa/models/a/b/x.gguf'",
     "[Errno 2] No such file or directory: 'x.gguf'"),
    ("C:\\Users\\owner\\models\\x.gguf failed", "x.gguf failed"),
    ("see /v1/models and /health", "see /v1/models and /health"),
    ("model 'org/name' is not in the store", "model 'org/name' is not in the store"),
    ("http://example.com/a/b.png answered HTTP 404", "http://example.com/a/b.png answered HTTP 404"),
    ("ratio 1/2", "ratio 1/2"),
])
def test_scrub(text, expected):
    assert scrub(text) == expected


def test_validation_errors_are_openai_shaped(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b"{", timeout=30,
                   headers={"Content-Type": "application/json"})
    relkit.assert_error(r, 400)
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=30,
                   json={"model": "leak/chat-plain", "messages": "nope"})
    err = relkit.assert_error(r, 400)
    assert "msgspec" not in err["message"] and "litestar" not in err["message"].lower()
    assert json.dumps(err)
