"""``nexa serve --engine ray`` as a process: restart and reattach, loopback, token auth.

A real ``nexa serve`` is stopped and started again against the same cluster; the first
request after the restart is served by the same replica process without a second model
load (its load counter and process id). A server without the cluster's token is refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import httpx
import psutil
import pytest
import ray
from conftest import kill_namespace, wait_for

nexa_llama_cpp = pytest.importorskip("nexa_llama_cpp", reason="the ray session installs the llama.cpp plugin")
from nexa_llama_cpp.plugin import SMOLLM2_NAME  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nexa(ray_cluster, home, port: int, log) -> subprocess.Popen:  # noqa: ANN001
    env = {**os.environ, **ray_cluster.env, "NEXA_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    # As a user would: the loopback switch and the cluster's token; the server turns
    # Ray's token mode on because a token is given.
    env.pop("RAY_AUTH_MODE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "nexa.cli", "serve", SMOLLM2_NAME, "--port", str(port), "--threads", "1",
         "--engine", "ray", "--ray-address", ray_cluster.address, "--replicas", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def wait_served(port: int, process: subprocess.Popen) -> None:
    def up() -> bool:
        assert process.poll() is None, "nexa serve exited"
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        except httpx.HTTPError:
            return False
        return SMOLLM2_NAME in health["models_loaded"]

    wait_for(up, "nexa serve to load its model", timeout=180, interval=0.2)


def test_restarted_server_reattaches_without_reloading(ray_cluster, tmp_path):
    """Default namespace (``nexa``), as a user runs it; the test owns this cluster."""
    name = f"nexa/{SMOLLM2_NAME}/llama-cpp/0"
    port = free_port()
    log_path = tmp_path / "serve.log"
    body = {"model": SMOLLM2_NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        with open(log_path, "ab") as log:
            first = start_nexa(ray_cluster, tmp_path / "home", port, log)
            wait_served(port, first)
            assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).status_code == 200
            before = ray.get(ray.get_actor(name, namespace="nexa").status.remote(), timeout=30)
            assert before.loads == 1
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=60) == 0
            # The replica outlives the server, still loaded.
            kept = ray.get(ray.get_actor(name, namespace="nexa").status.remote(), timeout=30)
            assert (kept.pid, kept.loads, kept.loaded) == (before.pid, 1, True)

            second = start_nexa(ray_cluster, tmp_path / "home", port, log)
            wait_served(port, second)
            # The server and its Ray client (the driver's own RPC port) listen on loopback only.
            listening = [c.laddr for c in psutil.Process(second.pid).net_connections("inet") if c.status == "LISTEN"]
            assert listening and all(ipaddress.ip_address(a.ip.removeprefix("::ffff:")).is_loopback
                                     for a in listening), listening
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
            after = ray.get(ray.get_actor(name, namespace="nexa").status.remote(), timeout=30)
            assert (after.pid, after.loads, after.loaded_at) == (before.pid, 1, before.loaded_at), \
                "the restarted server must reattach, not reload"
            assert after.served >= before.served + 1
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
        assert "reattached to replica" in log_path.read_text()
    finally:
        for process in (locals().get("first"), locals().get("second")):
            if process is not None and process.poll() is None:
                process.kill()
        kill_namespace("nexa")


def test_a_server_without_the_cluster_token_is_refused(ray_cluster, tmp_path):
    """Ray's token authentication stays on: no token, no connection, a clear error."""
    env = {**os.environ, **ray_cluster.env, "NEXA_HOME": str(tmp_path)}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-m", "nexa.cli", "serve", SMOLLM2_NAME, "--port", str(free_port()),
         "--engine", "ray", "--ray-address", ray_cluster.address],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0
    assert "could not connect to the Ray cluster" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr


def test_without_an_address_the_server_runs_a_loopback_cluster_of_its_own(tmp_path):
    """No --ray-address, no RAY_ADDRESS: a new single-node cluster on 127.0.0.1 that ends
    with the server (a token is given so that Ray writes none to ~/.ray)."""
    ray_tmp = tempfile.mkdtemp(prefix="nxo", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_TOKEN=secrets.token_hex(24), NEXA_HOME=str(tmp_path))
    port = free_port()
    try:
        with open(tmp_path / "serve.log", "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "nexa.cli", "serve", SMOLLM2_NAME, "--port", str(port), "--threads", "1",
                 "--engine", "ray"], env=env, stdout=log, stderr=subprocess.STDOUT)
            wait_served(port, server)
            body = {"model": SMOLLM2_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
            assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).status_code == 200
            # Every process of that cluster listens on loopback only.
            ours = [p for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or ())]
            assert ours
            for process in [psutil.Process(server.pid), *ours]:
                with contextlib.suppress(psutil.Error):
                    for c in process.net_connections("inet"):
                        if c.status == "LISTEN":
                            assert ipaddress.ip_address(c.laddr.ip.removeprefix("::ffff:")).is_loopback, c
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=120) == 0
        wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"])
                              if ray_tmp in " ".join(p.info["cmdline"] or ())], "its cluster to end", timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
