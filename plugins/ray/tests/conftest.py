"""A real two-node Ray cluster on loopback for the whole test session.

Loopback only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (else Ray rewrites 127.0.0.1 to
the machine's external address) for the cluster and every client, including the
``nexa serve`` processes the tests start. Token authentication is on (a random token
per session, passed to clients as ``RAY_AUTH_TOKEN``; nothing is written to
``~/.ray``). A temporary ``RAY_TMPDIR``, small object stores and a bounded memory
resource. Never ``ray stop`` (it would kill every Ray process on the machine): the
cluster is shut down through its own handle.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import attrs
import pytest

OBJECT_STORE = 80 * 1024 * 1024
NODE_MEMORY = 6 * 1024**3
ROLE = "nexa-test/role"
"""Node label: ``head`` or ``worker``; tests pin replicas to workers with it."""


@attrs.define
class RayCluster:
    cluster: object
    address: str
    env: dict[str, str]
    """What a client process needs in its environment (loopback, token)."""
    worker: object

    def add_worker(self, **resources: float) -> object:
        return self.cluster.add_node(
            num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=OBJECT_STORE, memory=NODE_MEMORY,
            labels={ROLE: "worker"}, resources=resources or None,
        )

    def remove(self, node: object) -> None:
        self.cluster.remove_node(node, allow_graceful=False)


# Set before anything imports Ray (test modules do): Ray reads its settings once, at import.
RAY_TMPDIR = tempfile.mkdtemp(prefix="nxr", dir="/tmp")  # short: Ray's unix sockets live under it
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TMPDIR": RAY_TMPDIR,
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(24),
    "RAY_USAGE_STATS_ENABLED": "0",
}
os.environ.update(RAY_ENV)
atexit.register(shutil.rmtree, RAY_TMPDIR, True)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2, "node_ip_address": "127.0.0.1", "object_store_memory": OBJECT_STORE,
            "memory": NODE_MEMORY, "include_dashboard": False, "labels": {ROLE: "head"},
        },
    )
    handle = RayCluster(cluster, cluster.address, dict(RAY_ENV), None)
    handle.worker = handle.add_worker()
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="nexa-tests", log_to_driver=False)
    try:
        yield handle
    finally:
        ray.shutdown()
        cluster.shutdown()


def kill_namespace(name: str) -> None:
    """Kill every replica left in a Ray namespace (detached actors outlive servers)."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == name:
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=name), no_restart=True)
            except (ValueError, ray.exceptions.RayError):
                pass


@pytest.fixture
def namespace(ray_cluster: RayCluster) -> Iterator[str]:
    """A Ray namespace of the test's own; every replica left in it is killed afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    kill_namespace(name)


def wait_for(predicate, what: str, timeout: float = 120.0, interval: float = 0.1):  # noqa: ANN001, ANN201
    """Poll observable state until ``predicate()`` is truthy; fail with ``what`` after a
    generous bound (machines are shared and slow)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def ready_proxy(server, model: str = "test/echo"):  # noqa: ANN001, ANN201
    """The model's RayBackend once loaded (preloaded at start) with every replica ready."""

    def ready():  # noqa: ANN202
        entry = next((e for e in server.app.state.manager.loaded() if e.manifest.name == model), None)
        if entry is None or not entry.ready.done():
            return None
        return entry.backend if all(r.state == "ready" for r in entry.backend.replicas()) else None

    return wait_for(ready, f"{model} loaded with every replica ready")
