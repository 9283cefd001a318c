"""The Ray engine's mechanics on a real two-node cluster, with the echo test double as
the model (cheap to load): routing, cancellation, errors, queue bounds, metrics, retry.
The same behaviour on real models is in test_real_models.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from conftest import ready_proxy, wait_for

from nexa.backend import LoadOptions
from nexa.config import ServerConfig
from nexa.testing import EchoBackend, conformance, echo_manifest, serve
from nexa.types import Device

LONG = " ".join(f"w{i}" for i in range(400))


def echo_server(tmp_path, namespace: str, replicas: int = 2, **fields):  # noqa: ANN001, ANN201
    options = {"namespace": namespace, "replicas": {"": replicas}, **fields.pop("engine_options", {})}
    models = [fields.pop("manifest", echo_manifest(delay=0.005))]
    return serve([EchoBackend], home=tmp_path, models=models, load_entry_points=True, engine="ray",
                 engine_options=options, default_model="test/echo", **fields)


def test_nothing_of_ray_is_imported_without_the_engine(tmp_path):
    code = (
        "import sys\n"
        "from nexa.plugins import load_plugins\n"
        "from nexa.server.app import create_app\n"
        "from nexa.config import ServerConfig\n"
        "plugins = load_plugins()\n"
        "assert 'ray' in plugins.engines, plugins.failures\n"
        f"create_app(ServerConfig(home={str(tmp_path)!r}), plugins=plugins)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_nexa_plugins_lists_the_engine(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nexa.cli", "plugins"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NEXA_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "engines: local (in-process, the default), ray (ray)" in out.stdout


def test_the_conformance_kit_passes_through_replicas(ray_cluster, namespace):
    from nexa_ray.engine import RayEngine

    engine = RayEngine(ServerConfig(engine="ray", engine_options={"namespace": namespace, "replicas": {"": 2}}),
                       Device("cpu"))

    async def run() -> None:
        await engine.start()
        backend = engine.backend(EchoBackend, echo_manifest(delay=0.002), Device("cpu"), LoadOptions())
        await backend.start()
        try:
            await conformance.check_chat_async(backend)
            await conformance.check_embed_async(backend)
            await conformance.check_images_async(backend)
        finally:
            await backend.stop()
            await engine.stop()

    asyncio.run(run())


def test_requests_spread_over_replicas_on_both_nodes(ray_cluster, namespace, tmp_path):
    with echo_server(tmp_path, namespace) as server:
        proxy = ready_proxy(server)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-")
        for i in range(6):
            answer = client.chat.completions.create(
                model="test/echo", messages=[{"role": "user", "content": f"hello number {i}"}])
            assert answer.choices[0].message.content == f"hello number {i}"
        replicas = wait_for(lambda: (rs := proxy.replicas()) and all(r.served >= 3 for r in rs) and rs,
                            "both replicas to have served")
        assert len({r.node_id for r in replicas}) == 2, "replicas of a model spread over the nodes"
        assert all(r.resources.get("CPU") == 1.0 for r in replicas)
        # Replicas run at normal priority, not at the nice 15 Ray gives its workers (the
        # cluster is on this machine: the replicas' processes are visible here).
        assert [os.getpriority(os.PRIO_PROCESS, r.pid) for r in replicas] == [0, 0]
        # /metrics: every replica's figures, labelled by replica and node.
        metrics = httpx.get(server.base_url + "/metrics").text
        for r in replicas:
            label = f'node="{r.node_id}",replica="{r.name}"'
            assert f'nexa_backend_ray_replica_ready{{backend="echo",model="test/echo",{label}}} 1.0' in metrics
            assert f'nexa_backend_echo_chats_started_total{{backend="echo",model="test/echo",{label}}}' in metrics
        assert 'nexa_backend_ray_replicas_ready{backend="echo",model="test/echo"} 2.0' in metrics


def test_client_disconnect_frees_the_replica_slot(ray_cluster, namespace, tmp_path):
    manifest = echo_manifest(delay=0.05, context_length=1000)
    with echo_server(tmp_path, namespace, replicas=1, manifest=manifest) as server:
        proxy = ready_proxy(server)
        body = {"model": "test/echo", "stream": True, "messages": [{"role": "user", "content": LONG}]}
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            wait_for(lambda: proxy.replicas()[0].active == 1, "the replica to run the chat")
        # The client left after a few words of 400 (20 s of work): the replica stops.
        wait_for(lambda: proxy.replicas()[0].active == 0, "the replica's slot to free", timeout=60)
        assert server.app.state.manager.loaded()[0].active == 0


def test_backend_errors_keep_their_status_and_shape(ray_cluster, namespace, tmp_path):
    with echo_server(tmp_path, namespace, replicas=1, manifest=echo_manifest(context_length=4)) as server:
        long = {"model": "test/echo", "messages": [{"role": "user", "content": "one two three four five six"}]}
        response = httpx.post(server.base_url + "/v1/chat/completions", json=long, timeout=60)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"
        response = httpx.post(server.base_url + "/v1/chat/completions", json={**long, "stream": True}, timeout=60)
        assert response.status_code == 400  # before any output: a real HTTP error, as in-process


def test_a_model_that_fails_to_load_on_its_replicas_is_a_clear_error(ray_cluster, namespace, tmp_path):
    with echo_server(tmp_path, namespace, manifest=echo_manifest(fail_load=True)) as server:
        response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                              json={"model": "test/echo", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "model_load_failed" and "told to fail loading" in error["message"]
        assert not server.app.state.manager.loaded()


def test_queue_bound_and_503_hold_across_replicas(ray_cluster, namespace, tmp_path):
    # 2 replicas x 1 slot, 1 may wait: the 4th concurrent request is refused.
    with echo_server(tmp_path, namespace, manifest=echo_manifest(delay=0.05), parallel=1, queue_size=1) as server:
        proxy = ready_proxy(server)
        assert proxy.parallel == 2
        entry = server.app.state.manager.loaded()[0]
        body = {"model": "test/echo", "messages": [{"role": "user", "content": " ".join(["w"] * 60)}]}
        results: list[int] = []

        def call() -> None:
            results.append(httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120).status_code)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: entry.active == 2 and entry.waiting == 1, "2 running and 1 waiting")
        refused = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "server_busy"
        for t in threads:
            t.join()
        assert results == [200, 200, 200]


def test_a_request_on_a_dead_replica_is_retried_on_another(ray_cluster, namespace, tmp_path):
    # The poll would notice a death within its interval; slowed down, the request itself
    # finds the dead replica and must go to the other one with no error.
    with echo_server(tmp_path, namespace, engine_options={"poll_interval": 3600}) as server:
        proxy = ready_proxy(server)
        victim = proxy.replicas()[0]
        os.kill(victim.pid, signal.SIGKILL)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
        for i in range(4):  # alternating: at least one is routed to the dead replica first
            stream = client.chat.completions.create(
                model="test/echo", stream=True, messages=[{"role": "user", "content": f"still here {i}"}])
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == f"still here {i}"
        embedded = client.embeddings.create(model="test/echo", input=["x"])
        assert len(embedded.data) == 1
        states = {r.name: r.state for r in proxy.replicas()}
        assert states[victim.name] == "unavailable", "the request itself found the replica dead"


def test_a_stream_that_lost_its_replica_mid_answer_ends_with_an_error_not_spliced(ray_cluster, namespace, tmp_path):
    words = " ".join(f"w{i}" for i in range(100))
    manifest = echo_manifest(delay=0.05, context_length=1000)
    with echo_server(tmp_path, namespace, replicas=2, manifest=manifest) as server:
        proxy = ready_proxy(server)
        body = {"model": "test/echo", "stream": True, "messages": [{"role": "user", "content": words}]}
        text, events = "", []
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                events.append(event)
                if "error" in event:
                    break
                text += "".join(c["delta"].get("content") or "" for c in event["choices"])
                if len(events) == 3:  # some of the answer is out: lose its replica now
                    victim = next(r for r in proxy.replicas() if r.in_flight == 1)
                    os.kill(victim.pid, signal.SIGKILL)
        assert events[-1]["error"]["code"] == "replica_lost"
        assert text and words.startswith(text), "what was sent is a prefix of one run, nothing spliced"
        assert len(text) < len(words)
        # Another request is served by the other replica meanwhile.
        assert httpx.post(server.base_url + "/v1/embeddings", json={"model": "test/echo", "input": "x"},
                          timeout=60).status_code == 200


@pytest.mark.parametrize("placement, message", [
    ('{"num_cpus": -1}', "num_cpus must be a number"),
    ('{"lifetime": "x"}', "does not take"),
    ("not json", "is not JSON"),
])
def test_bad_placement_is_refused_before_connecting(tmp_path, placement, message):
    from nexa.errors import NexaError
    from nexa_ray.engine import RayEngine

    with pytest.raises(NexaError, match=message):
        RayEngine(ServerConfig(engine="ray", engine_options={"placement": {"": placement}}), Device("cpu"))
