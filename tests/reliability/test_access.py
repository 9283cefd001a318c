"""Who gets in: loopback bind, API keys, DNS rebinding, CORS.

- ``nexa serve`` binds 127.0.0.1 by default; a non-loopback bind without an API key
  (``--api-key`` or ``NEXA_API_KEY``) is refused unless ``--insecure`` is given.
- ``Authorization: Bearer KEY`` is compared with ``hmac.compare_digest`` (constant time);
  a missing or wrong key is a 401 in the OpenAI shape; ``/health`` stays open for probes.
- On a loopback bind a request whose ``Host`` is not a loopback name is refused (403),
  which is what stops a DNS-rebinding web page from reaching the server.
- CORS is off unless ``--origins`` names origins; then only those get CORS headers.
"""

from __future__ import annotations

import hmac
import os
import socket
import subprocess
import sys

import httpx
import openai
import pytest

import relkit
from nexa import cli
from nexa.config import ServerConfig
from nexa.testing import EchoBackend, echo_manifest, serve

MODEL = "test/echo"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def _serve(home, **config):
    return serve([EchoBackend], home=home, models=[echo_manifest(MODEL)], **config)


# --- binding ---------------------------------------------------------------------------


def test_default_bind_is_loopback():
    assert ServerConfig().host == "127.0.0.1"
    args = cli.build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    assert cli._server_config(args).host == "127.0.0.1"


def _nexa(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "NEXA_API_KEY"}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "nexa.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=environ)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.1.2.3", "example.com"])
def test_public_bind_without_key_is_refused(host, home):
    done = _nexa("--home", str(home), "serve", "--host", host, "--port", "1")
    assert done.returncode != 0
    assert "--api-key" in done.stderr and "--insecure" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_bind_needs_no_key(host):
    args = cli.build_parser().parse_args(["serve", "--host", host])
    assert cli._server_config(args).api_key is None


def test_public_bind_with_a_key_or_insecure_is_allowed(monkeypatch):
    parse = cli.build_parser().parse_args
    config = cli._server_config(parse(["serve", "--host", "0.0.0.0", "--api-key", "k1"]))
    assert config.api_key == "k1"
    monkeypatch.setenv("NEXA_API_KEY", "k2")
    assert cli._server_config(parse(["serve", "--host", "0.0.0.0"])).api_key == "k2"
    monkeypatch.delenv("NEXA_API_KEY")
    config = cli._server_config(parse(["serve", "--host", "0.0.0.0", "--insecure"]))
    assert config.api_key is None and config.allow_insecure_bind


# --- API keys --------------------------------------------------------------------------


@pytest.fixture
def keyed(home):
    with _serve(home, api_key="s3cret-key") as handle:
        yield handle


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer wrong", "Bearer s3cret-ke", "Bearer s3cret-key2",
                                    "Basic s3cret-key", "s3cret-key", "Bearer s3cret-key s3cret-key"])
def test_missing_or_wrong_key_is_401(keyed, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, path, body in [("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None),
                               ("GET", "/metrics", None), ("GET", "/v1/plugins", None)]:
        r = httpx.request(method, keyed.base_url + path, json=body, headers=headers, timeout=10)
        relkit.assert_error(r, 401, "invalid_api_key")


def test_right_key_is_let_in(keyed):
    r = httpx.post(keyed.base_url + "/v1/chat/completions", json=CHAT, timeout=10,
                   headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200, r.text
    r = httpx.get(keyed.base_url + "/v1/models", headers={"authorization": "bearer s3cret-key"}, timeout=10)
    assert r.status_code == 200
    client = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="s3cret-key", max_retries=0)
    assert client.chat.completions.create(**CHAT).choices[0].message.content == "hello"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("header", ["Bearer s3cret-key", "bearer s3cret-key", "BEARER s3cret-key",
                                    "Bearer  s3cret-key", "Bearer s3cret-key\t", "Bearer s3cret-key  ",
                                    " Bearer s3cret-key"])
def test_authorization_parsing_as_documented(keyed, header):
    """security.py: scheme case-insensitive, spaces between scheme and key, whitespace
    around the key ignored. Sent raw: httpx won't send whitespace at either end."""
    host = keyed.base_url.rsplit("/", 1)[-1]
    with socket.create_connection(tuple(host.split(":")), timeout=10) as sock:
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: {header}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = relkit.read_until(sock, b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), (header, answer[:200])


@pytest.mark.parametrize("header", ["Bearer\ts3cret-key", "Bearers3cret-key", "Bearer s3cret key", "Token s3cret-key"])
def test_authorization_parsing_refuses_the_rest(keyed, header):
    r = httpx.get(keyed.base_url + "/v1/models", headers={"Authorization": header}, timeout=10)
    relkit.assert_error(r, 401, "invalid_api_key")


def test_health_stays_open_for_probes(keyed):
    assert httpx.get(keyed.base_url + "/health", timeout=10).status_code == 200


def test_key_is_compared_in_constant_time(keyed, monkeypatch):
    """Every key check goes through hmac.compare_digest, never ``==``."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for token in ("wrong", "s3cret-key"):
        httpx.get(keyed.base_url + "/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert (b"wrong", b"s3cret-key") in calls and (b"s3cret-key", b"s3cret-key") in calls


# --- DNS rebinding ---------------------------------------------------------------------


@pytest.fixture
def local(home):
    with _serve(home) as handle:
        yield handle


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil.example",
                                  "192.168.1.20", "[2001:db8::1]:80", "0.0.0.0", "attacker.com:{port}"])
def test_foreign_host_header_is_403(local, host):
    host = host.format(port=local.port)
    for method, path, body in [("POST", "/v1/chat/completions", CHAT), ("GET", "/health", None),
                               ("GET", "/v1/models", None)]:
        r = httpx.request(method, local.base_url + path, json=body, headers={"Host": host}, timeout=10)
        relkit.assert_error(r, 403, "forbidden")


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "localhost", "LOCALHOST:{port}",
                                  "[::1]:{port}", "127.0.0.2:{port}", "app.localhost:{port}"])
def test_loopback_host_header_is_served(local, host):
    r = httpx.post(local.base_url + "/v1/chat/completions", json=CHAT, timeout=10,
                   headers={"Host": host.format(port=local.port)})
    assert r.status_code == 200, r.text


def test_rebinding_is_refused_before_the_key_is_checked(home):
    with _serve(home, api_key="k") as server:
        r = httpx.get(server.base_url + "/v1/models", timeout=10,
                      headers={"Host": "evil.example", "Authorization": "Bearer k"})
        relkit.assert_error(r, 403, "forbidden")


# --- CORS ------------------------------------------------------------------------------


def _preflight(server, origin):
    return httpx.options(server.base_url + "/v1/chat/completions", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})


def test_cors_is_off_by_default(local):
    r = _preflight(local, "http://app.example")
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(local.base_url + "/v1/chat/completions", json=CHAT, headers={"Origin": "http://app.example"},
                   timeout=10)
    assert "access-control-allow-origin" not in r.headers


def test_origins_allows_the_named_origins_only(home):
    with _serve(home, origins=("http://app.example",), api_key="k") as server:
        ok = _preflight(server, "http://app.example")
        assert ok.status_code in (200, 204), ok.text
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        bad = _preflight(server, "http://evil.example")
        assert bad.headers.get("access-control-allow-origin") != "http://evil.example"
        assert "*" not in bad.headers.get("access-control-allow-origin", "")
        r = httpx.post(server.base_url + "/v1/chat/completions", json=CHAT, timeout=10,
                       headers={"Origin": "http://app.example", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.post(server.base_url + "/v1/chat/completions", json=CHAT, timeout=10,
                       headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers


def test_cli_origins_reach_the_config():
    args = cli.build_parser().parse_args(["serve", "--origins", "http://a.example", "http://b.example"])
    assert cli._server_config(args).origins == ("http://a.example", "http://b.example")
    assert cli._server_config(cli.build_parser().parse_args(["serve"])).origins == ()
