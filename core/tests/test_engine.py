"""The engine hook: a registered engine makes every model's backend, the HTTP layer unchanged.

``RecordingEngine`` is a declared TEST DOUBLE of an engine: it runs the real backend in
this process behind a stand-in that counts the calls reaching it, and records its
lifecycle, so the contract (register_engines, Engine.start/backend/detach/stop, options,
metric labels) is checked without Ray. The Ray engine's own tests are in plugins/ray.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from nexa.backend import Backend
from nexa.cli import _server_config, build_parser
from nexa.config import ServerConfig
from nexa.engine import Engine
from nexa.errors import NexaError
from nexa.hookspecs import hookimpl
from nexa.plugins import load_plugins
from nexa.server.app import create_app
from nexa.testing import EchoBackend, StaticPlugin, echo_manifest, serve
from nexa.types import BackendMetric


class StandIn(Backend):
    """Delegates to a real backend in this process; counts what passes through."""

    def __init__(self, inner: Backend, log: list[str]) -> None:
        self.inner = inner
        self.name = inner.name
        self.manifest = inner.manifest
        self.parallel = inner.parallel * 2
        self.stops_natively = inner.stops_natively
        self.log = log

    async def start(self) -> None:
        self.log.append(f"start {self.manifest.name}")
        await self.inner.start()

    async def stop(self) -> None:
        self.log.append(f"stop {self.manifest.name}")
        await self.inner.stop()

    async def stream_chat(self, request) -> AsyncIterator:  # noqa: ANN001
        self.log.append("chat")
        async for chunk in self.inner.stream_chat(request):
            yield chunk

    async def run_embed(self, request):  # noqa: ANN001, ANN201
        self.log.append("embed")
        return await self.inner.run_embed(request)

    def runtime_metrics(self) -> list[BackendMetric]:
        return [
            BackendMetric("standin_calls", len(self.log), "counter", "calls seen", labels={"replica": "r0", "node": "n1"}),
            BackendMetric("standin_bad", 1, labels={"model": "clash"}),  # refused: model is the core's label
        ]


class RecordingEngine(Engine):
    name = "recording"
    instances: list[RecordingEngine] = []

    def __init__(self, config: ServerConfig, device) -> None:  # noqa: ANN001
        super().__init__(config, device)
        if set(config.engine_options) - {"replicas"}:
            raise NexaError(f"the recording engine does not take {sorted(config.engine_options)}")
        self.log: list[str] = []
        RecordingEngine.instances.append(self)

    async def start(self) -> None:
        self.log.append("engine start")

    def backend(self, cls, manifest, device, options) -> Backend:  # noqa: ANN001
        self.log.append(f"backend {cls.name} {manifest.name}")
        return StandIn(cls(manifest, device, options), self.log)

    def detach(self) -> None:
        self.log.append("detach")

    async def stop(self) -> None:
        self.log.append("engine stop")


class EnginePlugin:
    @hookimpl
    def register_engines(self, register) -> None:  # noqa: ANN001
        register(RecordingEngine)


def test_register_engines_hook_collects_engine_classes():
    plugins = load_plugins(load_entry_points=False, extra_plugins=[EnginePlugin()])
    assert plugins.engines["recording"][0] is RecordingEngine
    assert not plugins.failures


def test_engine_serves_every_request_and_sees_the_lifecycle(tmp_path):
    RecordingEngine.instances.clear()
    with serve([EchoBackend], home=tmp_path, models=[echo_manifest()], extra_plugins=[EnginePlugin()],
               engine="recording", engine_options={"replicas": {"": 2}}) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-")
        answer = client.chat.completions.create(model="test/echo", messages=[{"role": "user", "content": "hi there"}])
        assert answer.choices[0].message.content == "hi there"
        client.embeddings.create(model="test/echo", input=["a"])
        metrics = httpx.get(server.base_url + "/metrics").text
        # A labelled figure keeps the core's labels and adds the engine's own.
        assert 'nexa_backend_standin_calls_total{backend="echo",model="test/echo",node="n1",replica="r0"}' in metrics
        assert "nexa_backend_standin_bad" not in metrics
        entry = server.app.state.manager.loaded()[0]
        assert entry.slots._value == EchoBackend.parallel * 2  # the stand-in's parallel
    log = RecordingEngine.instances[-1].log
    assert log[:3] == ["engine start", "backend echo test/echo", "start test/echo"]
    assert "chat" in log and "embed" in log
    # At shutdown: detach first, then each model stops, then the engine.
    assert log[-3:] == ["detach", "stop test/echo", "engine stop"]


def test_no_engine_makes_backends_in_process(tmp_path):
    with serve([EchoBackend], home=tmp_path, models=[echo_manifest()], extra_plugins=[EnginePlugin()]) as server:
        httpx.post(server.base_url + "/v1/embeddings", json={"model": "test/echo", "input": "a"}).raise_for_status()
        entry = server.app.state.manager.loaded()[0]
        assert type(entry.backend) is EchoBackend
        assert server.app.state.manager.engine is None


def test_unknown_engine_and_bad_options_are_clear_errors(tmp_path):
    plugins = load_plugins(load_entry_points=False, extra_plugins=[StaticPlugin([EchoBackend]), EnginePlugin()])
    with pytest.raises(NexaError, match=r"unknown engine 'nope' \(installed: local, recording\)"):
        create_app(ServerConfig(home=tmp_path, engine="nope"), plugins=plugins)
    with pytest.raises(NexaError, match="does not take"):
        create_app(ServerConfig(home=tmp_path, engine="recording", engine_options={"colour": 1}), plugins=plugins)


def test_engine_registrations_that_are_refused():
    class Named(Engine):
        name = "local"

    class Plugin:
        @hookimpl
        def register_engines(self, register) -> None:  # noqa: ANN001
            register(Named)

    class NotAnEngine:
        @hookimpl
        def register_engines(self, register) -> None:  # noqa: ANN001
            register(dict)

    plugins = load_plugins(load_entry_points=False, extra_plugins=[Plugin(), NotAnEngine()])
    errors = sorted(f.error for f in plugins.failures)
    assert any("taken by the in-process default" in e for e in errors)
    assert any("not a named Engine subclass" in e for e in errors)
    assert not plugins.engines


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_cli_engine_flags_become_engine_options():
    config = _server_config(serve_args(
        "--engine", "ray", "--replicas", "2", "--replicas", "org/model=3", "--ray-address", "10.0.0.5:6379",
        "--placement", '{"num_cpus": 2}', "--placement", 'org/model={"resources": {"big": 1}}',
    ))
    assert config.engine == "ray"
    assert config.engine_options == {
        "replicas": {"": 2, "org/model": 3},
        "address": "10.0.0.5:6379",
        "placement": {"": '{"num_cpus": 2}', "org/model": '{"resources": {"big": 1}}'},
    }


@pytest.mark.parametrize("argv, message", [
    (("--replicas", "2"), "need an engine"),
    (("--engine", "ray", "--replicas", "0"), "at least 1 replica"),
    (("--engine", "ray", "--replicas", "m=two"), "invalid literal"),
])
def test_cli_engine_flags_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        _server_config(serve_args(*argv))
