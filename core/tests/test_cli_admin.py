"""``nexa ps``, ``nexa load`` and ``nexa unload`` against a real server on loopback (the
echo test double as its backend), as a user runs them in a terminal."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import httpx
import pytest

from nexa.cli import main
from nexa.testing import EchoBackend, echo_manifest, serve

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


@pytest.fixture
def server(home):
    with serve([EchoBackend], home=home, models=[echo_manifest(), echo_manifest("test/other")]) as handle:
        yield handle


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_load_ps_unload(server, capsys):
    url = server.base_url
    status, out, _ = run(capsys, "load", "test/echo", "--url", url, "--parallel", "3", "--keep-alive", "10m")
    assert status == 0 and out.startswith("loaded test/echo (echo on ") and "3 slot(s)" in out
    status, out, _ = run(capsys, "ps", "--url", url)
    header, row = out.splitlines()
    assert header.split()[:3] == ["NAME", "BACKEND", "DEVICE"]
    assert row.split()[:2] == ["test/echo", "echo"] and "0/3" in row and re.search(r"\b(9|10) min\b", row)
    status, out, _ = run(capsys, "unload", "test/echo", "--url", url)
    assert status == 0 and out.strip() == "unloaded test/echo"
    status, out, _ = run(capsys, "ps", "--url", url)
    assert out.splitlines() == [out.splitlines()[0]]  # the header alone
    httpx.post(url + "/v1/chat/completions", json={"model": "test/other", "messages": [
        {"role": "user", "content": "hi"}]}, timeout=30).raise_for_status()
    status, out, _ = run(capsys, "unload", "test/other", "--url", url, "--cancel")
    assert status == 0 and out.strip() == "unloaded test/other, 0 request(s) cancelled"


def test_errors_are_one_line(server, capsys):
    status, _, err = run(capsys, "unload", "test/echo", "--url", server.base_url)
    assert status == 1 and err.strip() == "error: model 'test/echo' is not loaded"
    status, _, err = run(capsys, "load", "nope/missing", "--url", server.base_url)
    assert status == 1 and err.startswith("error: model 'nope/missing' is not") and len(err.splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    status, _, err = run(capsys, "ps", "--url", f"http://127.0.0.1:{closed}")
    assert status == 1 and "no nexa server answered" in err and "nexa serve" in err


def test_the_api_key_comes_from_the_environment(home, capsys, monkeypatch):
    with serve([EchoBackend], home=home, models=[echo_manifest()], api_key="s3cret") as handle:
        status, _, err = run(capsys, "ps", "--url", handle.base_url)
        assert status == 1 and "API key" in err
        monkeypatch.setenv("NEXA_API_KEY", "s3cret")
        status, out, _ = run(capsys, "load", "test/echo", "--url", handle.base_url)
        assert status == 0 and out.startswith("loaded test/echo")


def test_ps_json_has_the_documented_keys(server, capsys):
    run(capsys, "load", "test/echo", "--url", server.base_url)
    status, out, _ = run(capsys, "ps", "--url", server.base_url, "--json")
    entries = json.loads(out)
    text = DOCS.read_text()
    section = re.search(r"^### nexa ps --json\n(.*?)(?=^#)", text, re.S | re.M)
    assert section, "docs/cli.md has no section 'nexa ps --json'"
    documented = set(re.findall(r"^- `([a-z_]+)`", section.group(1), re.M))
    assert status == 0 and len(entries) == 1 and set(entries[0]) == documented
