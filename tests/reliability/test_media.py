"""Images named in chat messages: what the server will fetch, and what it refuses.

``data:`` URIs always work. Local paths only under the media folders (default: the folder
the server runs in), resolved with symlinks. http(s) is off by default; when enabled it
refuses loopback, private, link-local, metadata and every disguised form of them
(decimal, octal, hex, short IPv4, ``0.0.0.0``, IPv4-mapped/-compatible IPv6, 6to4,
NAT64), pins the address it checked, follows no redirect and caps size and time. A
refused URL is a 400 (413 for size), and a loopback listener that records every
connection proves that no connection was made.
"""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

import relkit
from nexa.server import media
from nexa.testing import EchoBackend, echo_manifest, serve

MODEL = "test/echo"
PNG = relkit.tiny_png()


def ask(server, url):
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": parts}]})


def seen(resp):
    """The echo model says how many images reached it."""
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"].startswith("[1 image(s)]")


def _serve(home, **config):
    return serve([EchoBackend], home=home, models=[echo_manifest(MODEL)], **config)


def test_data_uri_always_works(home):
    with _serve(home) as server:
        assert seen(ask(server, relkit.data_uri(PNG)))
        assert seen(ask(server, relkit.data_uri(PNG, "image/jpeg")))  # the bytes decide, not the label


# --- local paths -----------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    media_dir = tmp_path / "media"
    (media_dir / "sub").mkdir(parents=True)
    (media_dir / "pic.png").write_bytes(PNG)
    (media_dir / "sub" / "deep.png").write_bytes(PNG)
    (media_dir / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (media_dir / "link.png").symlink_to(outside / "secret.png")
    (media_dir / "linkdir").symlink_to(outside, target_is_directory=True)
    os.mkfifo(media_dir / "pipe.png")
    return media_dir, outside


@pytest.fixture
def local_server(home, folders):
    with _serve(home, media_dirs=(folders[0],)) as server:
        yield server


def test_paths_inside_the_media_folder_work(local_server, folders):
    media_dir, _ = folders
    for url in [str(media_dir / "pic.png"), "pic.png", "sub/deep.png", "sub/../pic.png",
                "file://" + str(media_dir / "pic.png"), "file://" + str(media_dir / "sub" / "%64eep.png")]:
        assert seen(ask(local_server, url)), url


@pytest.mark.parametrize("url", [
    "{outside}/secret.png", "../outside/secret.png", "sub/../../outside/secret.png",
    "file://{outside}/secret.png", "file://{media}/%2e%2e/outside/secret.png", "file:///etc/passwd", "/etc/passwd",
    "/etc/hostname", "~/.bashrc", "link.png", "linkdir/secret.png", "{media}/link.png", "/proc/self/environ",
    "/dev/zero",
])
def test_paths_outside_the_media_folder_are_400(local_server, folders, url, tmp_path):
    media_dir, outside = folders
    url = url.format(outside=outside, media=media_dir)
    err = relkit.assert_error(ask(local_server, url), 400, "invalid_image", tmp_path)
    assert "media folders" in err["message"]


@pytest.mark.parametrize("name", ["missing.png", "sub", "notes.txt", "pipe.png"])
def test_bad_files_inside_the_media_folder_are_400_at_once(local_server, name, tmp_path):
    started = time.monotonic()
    relkit.assert_error(ask(local_server, name), 400, "invalid_image", tmp_path)
    assert time.monotonic() - started < 5  # a FIFO must not block the request


def test_default_media_folder_is_the_working_directory(home, folders, monkeypatch, tmp_path):
    media_dir, outside = folders
    monkeypatch.chdir(media_dir)
    with _serve(home) as server:
        assert seen(ask(server, "pic.png"))
        relkit.assert_error(ask(server, str(outside / "secret.png")), 400, "invalid_image", tmp_path)


# --- http(s) ---------------------------------------------------------------------------


@pytest.fixture
def listener():
    with relkit.RecordingListener(body=PNG) as lst:
        yield lst


def _ipv6_listener():
    try:
        return relkit.RecordingListener("::1", body=PNG)
    except OSError:
        return None


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_remote_images_are_off_by_default(home, listener, scheme):
    with _serve(home) as server:
        err = relkit.assert_error(ask(server, f"{scheme}://127.0.0.1:{listener.port}/a.png"), 400, "invalid_image")
        assert "disabled" in err["message"]
        relkit.assert_error(ask(server, f"{scheme}://images.example/a.png"), 400, "invalid_image")
    assert listener.connections == 0


BLOCKED = [
    "http://127.0.0.1:{p}/a.png", "http://localhost:{p}/a.png", "http://127.1:{p}/a.png",
    "http://2130706433:{p}/a.png", "http://0x7f000001:{p}/a.png", "http://0177.0.0.1:{p}/a.png",
    "http://017700000001:{p}/a.png", "http://127.0.0.1.:{p}/a.png", "http://0.0.0.0:{p}/a.png", "http://0:{p}/a.png",
    "http://[::ffff:127.0.0.1]:{p}/a.png", "http://[::ffff:7f00:1]:{p}/a.png", "http://[::127.0.0.1]:{p}/a.png",
    "http://[::ffff:0:7f00:1]:{p}/a.png", "http://[64:ff9b::7f00:1]:{p}/a.png", "http://[2002:7f00:1::]:{p}/a.png",
    "http://[::]:{p}/a.png", "http://[::1]:{p}/a.png", "https://127.0.0.1:{p}/a.png", "HTTP://127.0.0.1:{p}/a.png",
    "http://user:pw@127.0.0.1:{p}/a.png", "http://images.example@127.0.0.1:{p}/a.png",
    "http://127.0.0.1:{p}#@images.example/a.png", "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/", "http://100.100.100.200/latest/meta-data/",
    "http://[fe80::a9fe:a9fe]/", "http://10.0.0.1/a.png", "http://172.16.0.1/a.png", "http://192.168.0.1/a.png",
    "http://[fc00::1]/a.png", "http://[fe80::1%25lo]:{p}/a.png", "http://224.0.0.1/a.png", "http://255.255.255.255/",
    "http://198.18.0.1/a.png", "http://[::ffff:169.254.169.254]/", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
    "http://127.0.0.1:99999/a.png", "http://127.0.0.1:port/a.png", "http://[::1/a.png", "http:///a.png",
    "ftp://127.0.0.1:{p}/a.png", "gopher://127.0.0.1:{p}/_GET", "dict://127.0.0.1:{p}/", "jar:http://127.0.0.1:{p}/!/",
]


def test_blocked_addresses_are_400_with_no_connection(home, listener):
    v6 = _ipv6_listener()
    try:
        with _serve(home, allow_remote_images=True) as server:
            for url in BLOCKED:
                port = v6.port if v6 is not None and "[::1]" in url else listener.port
                started = time.monotonic()
                relkit.assert_error(ask(server, url.format(p=port)), 400, "invalid_image")
                assert time.monotonic() - started < 5, f"{url} took {time.monotonic() - started:.1f}s"
                assert listener.connections == 0, f"{url} made a connection"
                assert v6 is None or v6.connections == 0, f"{url} made a connection"
    finally:
        if v6 is not None:
            v6.close()


@pytest.fixture
def loopback_is_public(monkeypatch):
    """Treat 127.0.0.1 (only) as a public address, so a loopback listener can play the web."""
    real = media.is_public_address
    monkeypatch.setattr(media, "is_public_address", lambda a: a == "127.0.0.1" or real(a))


def test_an_allowed_address_is_fetched(home, listener, loopback_is_public):
    # The control: the listener does record a connection the server makes.
    with _serve(home, allow_remote_images=True) as server:
        assert seen(ask(server, f"http://127.0.0.1:{listener.port}/a.png"))
    assert listener.connections == 1
    assert listener.requests[0].startswith(b"GET /a.png HTTP/1.1")


def test_redirects_are_not_followed(home, loopback_is_public):
    with relkit.RecordingListener(body=PNG) as target:
        location = f"Location: http://127.0.0.1:{target.port}/a.png\r\n".encode()
        with relkit.RecordingListener(status=b"302 Found", headers=location) as redirector:
            with _serve(home, allow_remote_images=True) as server:
                err = relkit.assert_error(ask(server, f"http://127.0.0.1:{redirector.port}/r"), 400, "invalid_image")
                assert "302" in err["message"]
            assert redirector.connections == 1
        assert target.connections == 0


@pytest.mark.parametrize("length", [True, False])
def test_remote_image_size_is_capped(home, loopback_is_public, length):
    big = relkit.tiny_png((2000, 2000)) + b"\0" * 20_000  # larger than the 16 KB cap
    with relkit.RecordingListener(body=big, length=length) as lst:
        with _serve(home, allow_remote_images=True, max_image_bytes=16_000) as server:
            relkit.assert_error(ask(server, f"http://127.0.0.1:{lst.port}/big.png"), 413, "payload_too_large")


def test_remote_image_time_is_capped(home, loopback_is_public, monkeypatch):
    monkeypatch.setattr(media, "REMOTE_TIMEOUT", 1.0)
    with relkit.RecordingListener(stall=8.0) as lst:
        with _serve(home, allow_remote_images=True) as server:
            started = time.monotonic()
            relkit.assert_error(ask(server, f"http://127.0.0.1:{lst.port}/slow.png"), 400, "invalid_image")
            assert time.monotonic() - started < 4
            assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200


def test_resolved_address_is_pinned(home, monkeypatch):
    """The address that passed the check is the one connected to: no second DNS answer."""
    real_getaddrinfo = socket.getaddrinfo
    lookups = []
    with relkit.RecordingListener(body=PNG) as checked:
        def rebinding_dns(host, port, *args, **kwargs):
            if host == "images.example":
                lookups.append(host)
                # First answer public (127.0.0.1 plays public here); any later one private.
                address = "127.0.0.1" if len(lookups) == 1 else "10.255.255.1"
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
            return real_getaddrinfo(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
        real_public = media.is_public_address
        monkeypatch.setattr(media, "is_public_address", lambda a: a == "127.0.0.1" or real_public(a))
        with _serve(home, allow_remote_images=True) as server:
            assert seen(ask(server, f"http://images.example:{checked.port}/a.png"))
        assert lookups == ["images.example"]
        assert checked.connections == 1
        assert f"Host: images.example:{checked.port}".encode() in checked.requests[0]
