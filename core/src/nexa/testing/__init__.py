"""The test kit for nexa and its backend authors.

- ``serve(backends=[...], home=...)``: the real app on uvicorn on 127.0.0.1 (random port)
  in a background thread, with entry-point autoload off and exactly the given backend
  classes (and ready models) registered.
- ``EchoBackend`` / ``echo_manifest``: a declared test double for the core's own tests.
- ``nexa.testing.conformance``: checks every backend of a task must pass.
- ``wait_until``: poll observable state (an HTTP listing, a metric) until it holds.
- The pytest plugin (``nexa.testing.pytest_plugin``, auto-registered) adds the fixture
  ``nexa_serve`` with the same signature as ``serve``, closed at teardown.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from nexa.config import ServerConfig
from nexa.hookspecs import hookimpl
from nexa.plugins import load_plugins
from nexa.store import ModelStore
from nexa.testing.echo import EchoBackend, echo_manifest
from nexa.types import Manifest, Task

__all__ = ["EchoBackend", "echo_manifest", "serve", "ServerHandle", "StaticPlugin", "wait_until"]


class StaticPlugin:
    """A plugin object that registers given backend classes and ready models."""

    def __init__(self, backends: Iterable[type] = (), models: Iterable[Manifest] = ()):
        self.backends = list(backends)
        self.models = list(models)

    def _register(self, task: Task, register: Any) -> None:
        for cls in self.backends:
            if task in cls.tasks:
                register(cls)

    @hookimpl
    def register_chat_backends(self, register: Any) -> None:
        self._register(Task.CHAT, register)

    @hookimpl
    def register_vlm_backends(self, register: Any) -> None:
        self._register(Task.VLM, register)

    @hookimpl
    def register_image_backends(self, register: Any) -> None:
        self._register(Task.IMAGE, register)

    @hookimpl
    def register_embed_backends(self, register: Any) -> None:
        self._register(Task.EMBED, register)

    @hookimpl
    def register_models(self, register: Any) -> None:
        for manifest in self.models:
            register(manifest)


@attrs.frozen
class ServerHandle:
    base_url: str
    """``http://127.0.0.1:PORT``; the OpenAI client's base_url is ``base_url + "/v1"``."""
    app: Any
    store: ModelStore
    server: Any

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


@contextlib.contextmanager
def serve(
    backends: Iterable[type] = (),
    *,
    home: Path | str,
    models: Iterable[Manifest] = (),
    load_entry_points: bool = False,
    **config_fields: Any,
) -> Iterator[ServerHandle]:
    """Run the real server on loopback with the given backends; stop it on exit."""
    import uvicorn

    from nexa.server.app import create_app

    plugins = load_plugins(
        load_entry_points=load_entry_points, extra_plugins=[StaticPlugin(backends, models)]
    )
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP; with proto 0 every keep-alive response waited ~40 ms for
    # a delayed ACK (Nagle), as `nexa serve` (uvicorn binding itself) never does.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = ServerConfig(home=Path(home), port=port, **config_fields)
    app = create_app(config, plugins=plugins)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield ServerHandle(f"http://127.0.0.1:{port}", app, app.state.store, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until(predicate: Any, what: str, timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Call ``predicate`` until it returns something true, and return that; fail naming
    ``what`` after ``timeout`` seconds. For tests that wait on observable state (a listing,
    a metric) rather than sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value
