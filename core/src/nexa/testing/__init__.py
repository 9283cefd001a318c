"""The test kit for nexa and its backend authors.

- ``serve(backends=[...], home=...)``: the real app on uvicorn on 127.0.0.1 (random port)
  in a background thread, with entry-point autoload off and exactly the given backend
  classes (and ready models) registered.
- ``EchoBackend`` / ``echo_manifest``: a declared test double for the core's own tests.
- ``nexa.testing.conformance``: checks every backend of a task must pass.
- The pytest plugin (``nexa.testing.pytest_plugin``, auto-registered) adds the fixture
  ``nexa_serve`` with the same signature as ``serve``, closed at teardown.
- ``wait_until`` and ``ServerHandle.metric``: tests wait on what the server shows (a
  ``/metrics`` sample, a log line, an event), never on sleeps.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` (observable state) every 10 ms until it is true; AssertionError
    naming ``what`` after ``timeout`` seconds. The timeout only bounds a failing test, so
    make it generous: a busy machine is slow, not wrong."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(0.01)


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
    def register_rerank_backends(self, register: Any) -> None:
        self._register(Task.RERANK, register)

    @hookimpl
    def register_transcribe_backends(self, register: Any) -> None:
        self._register(Task.TRANSCRIBE, register)

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

    def metric(self, sample: str) -> float | None:
        """The value of one ``GET /metrics`` sample, named with its labels as Prometheus
        prints them (``nexa_queue_depth{model="org/m"}``); None when absent."""
        import httpx

        text = httpx.get(self.base_url + "/metrics", timeout=30).text
        found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else None


@contextlib.contextmanager
def serve(
    backends: Iterable[type] = (),
    *,
    home: Path | str,
    models: Iterable[Manifest] = (),
    load_entry_points: bool = False,
    extra_plugins: Iterable[object] = (),
    **config_fields: Any,
) -> Iterator[ServerHandle]:
    """Run the real server on loopback with the given backends; stop it on exit.

    ``extra_plugins``: more plugin objects to register (an engine under test).
    """
    import uvicorn

    from nexa.server.app import create_app

    plugins = load_plugins(
        load_entry_points=load_entry_points, extra_plugins=[StaticPlugin(backends, models), *extra_plugins]
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
        yield ServerHandle(f"http://127.0.0.1:{port}", app, app.state.model_store, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
