"""``POST /v1/admin/pull``: a pull through the server from a loopback Hub, its progress
as server-sent events (the same ``PullProgress`` events ``nexa pull`` draws), and a pull
cancelled by its client leaving mid-way: nothing installed, the bytes kept for the next."""

from __future__ import annotations

import json

import httpx
import pytest

from nexa.progress import STAGES
from nexa.store import ModelStore
from nexa.testing import EchoBackend, echo_manifest, serve
from nexa.testing import wait_until as until
from nexa.testing.hubserver import HubServer, tiny_gguf_bytes

REPO = "acme/Served-GGUF"
WEIGHTS = "Served-Q4_K_M.gguf"
SIZE = 1_500_000


@pytest.fixture(scope="module")
def weights() -> bytes:
    return tiny_gguf_bytes(pad_bytes=SIZE, name="served")


@pytest.fixture
def hub(weights, env):
    with HubServer({REPO: {WEIGHTS: weights}}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def server(hub, home):
    with serve([EchoBackend], home=home, models=[echo_manifest()]) as handle:
        yield handle


def listed(handle) -> set[str]:
    return {m["id"] for m in httpx.get(handle.base_url + "/v1/models", timeout=30).json()["data"]}


def pulls(handle, outcome: str) -> float:
    return handle.metric(f'nexa_pulls_total{{outcome="{outcome}"}}') or 0.0


def test_pull_streams_progress_and_installs_the_model(server, weights):
    with httpx.stream("POST", server.base_url + "/v1/admin/pull", json={"model": REPO}, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert {e["stage"] for e in events} <= set(STAGES)
    assert events[0]["stage"] == "start" and events[0]["total"] == len(weights)
    mine = [e["stage"] for e in events if e["file"] == WEIGHTS]
    assert mine[0] == "file" and mine[-1] == "file_done"
    last = events[-1]
    assert (last["stage"], last["model"], last["done"], last["files_done"]) == ("done", REPO, len(weights), 1)
    assert [e["done"] for e in events] == sorted(e["done"] for e in events)
    assert REPO in listed(server)
    assert pulls(server, "done") == 1


def test_pull_errors_before_any_progress_are_http_errors(server):
    resp = httpx.post(server.base_url + "/v1/admin/pull", json={"model": "acme/Nowhere-GGUF"}, timeout=60)
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["code"] == "repo_not_found" and "acme/Nowhere-GGUF" in error["message"]
    missing = httpx.post(server.base_url + "/v1/admin/pull", json={"model": f"{REPO}:Q2_K"}, timeout=60)
    assert missing.status_code == 400 and "Q2_K" in missing.json()["error"]["message"]
    # Names the Hub would refuse are refused at the edge, the field named (no pull starts).
    for bad in ("../../etc", "acme/a b", "acme/x..y", "acme/ends-with-", "J0-", "-acme/x", "acme/a--b",
                "acme/repo.git", "acme/repo.git:Q8_0", "acme/" + "x" * 97, "acme/x\n"):
        resp = httpx.post(server.base_url + "/v1/admin/pull", json={"model": bad}, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "model", bad
        assert resp.json()["error"]["code"] != "store_error", bad
    extra = httpx.post(server.base_url + "/v1/admin/pull", json={"model": REPO, "quant": "Q8_0"}, timeout=60)
    assert extra.status_code == 400 and "quant" in extra.json()["error"]["message"]
    assert pulls(server, "failed") == 2  # the missing repo and the missing quant


def test_a_pull_whose_client_leaves_installs_nothing_and_resumes_later(server, hub, home, weights):
    hub.chunk_delay[(REPO, WEIGHTS)] = 0.05  # ~23 chunks of 64 KiB: about a second
    with httpx.stream("POST", server.base_url + "/v1/admin/pull", json={"model": REPO}, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["stage"] == "download":
                break  # mid-way: bytes have arrived, more are coming
    until(lambda: pulls(server, "cancelled") == 1, "the server to cancel the pull")
    # Nothing visible: not listed, no model folder; the bytes so far wait to be resumed.
    assert REPO not in listed(server)
    store = ModelStore(home)
    assert not any(p.name == "manifest.json" for p in store.models_dir.rglob("*"))
    parts = list((store.partial_dir / "blobs").glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(weights)
    kept = parts[0].stat().st_size

    hub.chunk_delay.clear()
    hub.range_starts.clear()
    with httpx.stream("POST", server.base_url + "/v1/admin/pull", json={"model": REPO}, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    began = next(e for e in events if e["stage"] == "file")
    assert began["resumed_from"] == kept and events[-1]["stage"] == "done"
    assert hub.range_starts[(REPO, WEIGHTS)] == [kept]
    assert REPO in listed(server)


def test_pull_is_management(hub, home):
    with serve([EchoBackend], home=home, api_key="k") as handle:
        resp = httpx.post(handle.base_url + "/v1/admin/pull", json={"model": REPO}, timeout=60)
        assert resp.status_code == 401
    with serve([EchoBackend], home=home, host="0.0.0.0", allow_insecure_bind=True) as handle:
        resp = httpx.post(handle.base_url + "/v1/admin/pull", json={"model": REPO}, timeout=60)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    assert not hub.requests, "a refused pull must not reach the hub"
