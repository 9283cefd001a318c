"""A web page the user visits can't drive the server from their browser.

On every route (the app's whole document, plus routes added later, which inherit the
app-level guard):

- a request that can change something (not GET, HEAD or OPTIONS) is refused (403
  ``cross_site_request``) when the browser says it comes from another site
  (``Sec-Fetch-Site: cross-site`` or ``same-site``) or, without that header, when its
  ``Origin`` is not the server itself; origins allowed by ``--origins`` pass;
- a body must be ``application/json`` (``multipart/form-data`` where the route takes
  that): a ``text/plain`` POST (a CORS "simple request", sent without asking) is a 415;
- GET and HEAD are never refused for this, and a same-origin page posting JSON works.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import pytest
from litestar import Controller, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, JSONBody

import relkit
from nexa.server import app as app_module
from nexa.testing import EchoBackend, echo_manifest, serve

MODEL = "test/echo"
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]},
    "/v1/messages": {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]},
    "/v1/responses": {"model": MODEL, "input": "hello"},
    "/v1/embeddings": {"model": MODEL, "input": "hello"},
    "/v1/images/generations": {"model": MODEL, "prompt": "a square", "size": "64x64", "response_format": "b64_json"},
    "/test/later": {"anything": 1},
}
EVIL = "http://evil.example"


class LaterController(Controller):
    """Routes "added by another change": their own before_request and guards must not
    replace the app's checks."""

    path = "/test"

    @post("/later", status_code=200, before_request=lambda request: None,
          guards=[lambda connection, handler: None])
    async def later(self, data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
        return {"got": data}

    @post("/upload")
    async def upload(self, data: Annotated[dict[str, Any], Body(media_type=RequestEncodingType.MULTI_PART)]) -> dict:
        return {"fields": sorted(data)}


@pytest.fixture
def routes(monkeypatch):
    monkeypatch.setattr(app_module, "ROUTES", [*app_module.ROUTES, LaterController])


@pytest.fixture
def server(home, routes):
    with serve([EchoBackend], home=home, models=[echo_manifest(MODEL)]) as handle:
        yield handle


def unsafe_operations(server) -> list[tuple[str, str]]:
    document = httpx.get(server.base_url + "/schema/openapi.json", timeout=30).json()
    found = [(method.upper(), path) for path, ops in document["paths"].items() for method in ops
             if method.upper() not in ("GET", "HEAD", "OPTIONS")]
    assert ("POST", "/v1/chat/completions") in found and ("POST", "/test/later") in found
    return found


def refused(resp, status: int, path: str, code: str) -> dict:
    """An error with this status in the shape of the API that owns ``path`` (Anthropic's
    on /v1/messages, which carries no code)."""
    assert resp.status_code == status, f"{path}: expected {status}, got {resp.status_code}: {resp.text[:300]}"
    error = relkit.check_error_body_for(path, resp.json())
    if "code" in error:
        assert error["code"] == code, error
    return error


def send(server, method, path, headers=None, body=None, **kwargs):
    content = json.dumps(BODIES.get(path, {}) if body is None else body).encode() if not kwargs else None
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.request(method, server.base_url + path, content=content, headers=headers, timeout=60, **kwargs)


@pytest.mark.parametrize("headers", [
    {"Origin": EVIL},
    {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"},  # another port of this host
    {"Origin": "null"},                                                # a sandboxed frame, a file:// page
    {"Origin": "http://127.0.0.1:1"},
])
def test_cross_site_requests_are_refused_on_every_route(server, headers):
    for method, path in unsafe_operations(server):
        err = refused(send(server, method, path, headers), 403, path, "cross_site_request")
        assert "--origins" in err["message"]
    assert server.app.state.manager.loaded() == []  # nothing ran


def test_same_origin_and_non_browser_requests_pass(server):
    same = {"Origin": server.base_url, "Sec-Fetch-Site": "same-origin"}
    for headers in (same, {"Origin": server.base_url}, {"Sec-Fetch-Site": "none"}, {}):
        for path in BODIES:
            r = send(server, "POST", path, headers)
            assert r.status_code == 200, (headers, path, r.text)


def test_get_and_head_are_never_refused_as_cross_site(server):
    document = httpx.get(server.base_url + "/schema/openapi.json", timeout=30).json()
    paths = [p.replace("{model_id}", MODEL).replace("{name}", "0" * 32 + ".png")
             for p, ops in document["paths"].items() if "get" in ops] + ["/", "/schema", "/schema/openapi.json"]
    for path in paths:
        for method in ("GET", "HEAD"):
            r = httpx.request(method, server.base_url + path, timeout=30,
                              headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
            assert r.status_code != 403 and r.status_code < 500, (method, path, r.status_code, r.text[:200])


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8", None,
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonx", "application/octet-stream"])
def test_bodies_must_be_json_on_every_json_route(server, content_type):
    document = httpx.get(server.base_url + "/schema/openapi.json", timeout=30).json()
    for method, path in unsafe_operations(server):
        takes = document["paths"][path][method.lower()].get("requestBody", {}).get("content", {})
        if path == "/test/upload" or "multipart/form-data" in takes:
            continue  # form uploads: test_a_multipart_route_takes_multipart_only
        body = json.dumps(BODIES.get(path, {"model": MODEL})).encode()
        headers = {"Content-Type": content_type} if content_type else {}
        r = httpx.request(method, server.base_url + path, content=body, headers=headers, timeout=60)
        refused(r, 415, path, "unsupported_media_type")
    assert server.app.state.manager.loaded() == []
    r = httpx.post(server.base_url + "/v1/embeddings", content=json.dumps(BODIES["/v1/embeddings"]).encode(),
                   headers={"Content-Type": "application/json; charset=utf-8"}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_multipart_route_takes_multipart_only(server):
    r = httpx.post(server.base_url + "/test/upload", files={"file": ("a.txt", b"hi")}, data={"x": "1"}, timeout=30)
    assert r.status_code == 201 and r.json() == {"fields": ["file", "x"]}, r.text
    relkit.assert_error(httpx.post(server.base_url + "/test/upload", json={"x": 1}, timeout=30), 415)
    r = httpx.post(server.base_url + "/test/upload", files={"file": ("a.txt", b"hi")}, timeout=30,
                   headers={"Origin": EVIL})
    relkit.assert_error(r, 403, "cross_site_request")
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        refused(httpx.post(server.base_url + path, json={"model": MODEL}, timeout=30), 415, path,
                "unsupported_media_type")
        empty = httpx.post(server.base_url + path, content=b"--x--\r\n", timeout=30,
                           headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert "multipart/form-data" in refused(empty, 400, path, "invalid_request")["message"]


def test_allowed_origins_pass_and_get_cors(home, routes):
    good = "http://good.example"
    with serve([EchoBackend], home=home, models=[echo_manifest(MODEL)], origins=(good,)) as server:
        preflight = httpx.options(server.base_url + "/v1/embeddings", timeout=30, headers={
            "Origin": good, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code in (200, 204), preflight.text
        assert preflight.headers.get("access-control-allow-origin") == good
        r = send(server, "POST", "/v1/embeddings", {"Origin": good, "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == good, r.text
        relkit.assert_error(send(server, "POST", "/v1/embeddings", {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}),
                            403, "cross_site_request")


def test_cross_site_is_refused_with_a_key_too(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(MODEL)], api_key="k") as server:
        auth = {"Authorization": "Bearer k"}
        relkit.assert_error(send(server, "POST", "/v1/embeddings", {**auth, "Origin": EVIL}), 403, "cross_site_request")
        assert send(server, "POST", "/v1/embeddings", auth).status_code == 200
