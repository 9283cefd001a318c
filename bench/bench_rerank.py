"""Rerank benchmark: 64 documents in one request vs the same 64 as single requests.

One request lets the backend score the documents in batches (a cross-encoder's pairs, a
GGUF reranker's pairs in as few llama.cpp decodes as its context holds, or an embedding
model's vectors for the cosine ranking); 64 requests pay 64 passes and 64 HTTP round
trips. Target: the one request at least 3x faster. Both paths go to a real
`nexa serve` subprocess (its own NEXA_HOME) with plain JSON over loopback, in rounds of
alternating order; each round's ratio is computed within the round and the median printed.
Not a timed test: the lead records the figures in docs/benchmarks.md.

    python bench/bench_rerank.py                                   # all-MiniLM-L6-v2 (cosine path)
    python bench/bench_rerank.py --model ORG/CROSS-ENCODER --rounds 10 --threads 2
    python bench/bench_rerank.py --gguf bge-reranker-v2-m3-Q8_0.gguf --ctx 4096   # llama.cpp reranker

A GGUF reranker (pooling type rank) is imported into the bench's own store; ``--ctx`` is
its context, which is also the most tokens one decode scores, and the llama.cpp decodes
the one 64-document request took are read from ``/metrics`` and printed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, resolve_model, start_nexa, stop  # noqa: E402

QUERY = "How do I keep tomato plants healthy through a hot summer?"
TOPICS = ["tomato plants", "the stock market", "medieval castles", "deep sea fish", "electric cars",
          "jazz music", "mountain weather", "bread baking"]


def documents(count: int) -> list[str]:
    """Passages of about 40 words on varied topics, one in eight about the query's."""
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        out.append(f"Passage {i} is about {topic}. " + " ".join(
            f"People who care about {topic} often say that attention, patience and practice matter most,"
            for _ in range(2)) + f" and note {i} ends here.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--gguf", type=Path, help="a GGUF reranker file (rank pooling), served by llama.cpp")
    parser.add_argument("--ctx", type=int, default=512, help="context length (a GGUF's tokens per decode too)")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import httpx

    docs = documents(args.documents)
    print(machine())
    with tempfile.TemporaryDirectory(prefix="nexa-bench-rerank-") as home:
        model = resolve_model(str(args.gguf), Path(home))[1] if args.gguf else args.model
        print(f"model {args.gguf or model}, {args.documents} documents of ~{len(docs[0].split())} words, "
              f"context {args.ctx}, {args.rounds} rounds")
        proc, base = start_nexa(model, Path(home), threads=args.threads, ctx=args.ctx, gpu=None)
        try:
            with httpx.Client(base_url=base, timeout=600) as client:

                def rerank(batch: list[str]) -> None:
                    r = client.post("/v1/rerank", json={"model": model, "query": QUERY, "documents": batch})
                    r.raise_for_status()

                def one_request() -> float:
                    started = time.perf_counter()
                    rerank(docs)
                    return time.perf_counter() - started

                def single_requests() -> float:
                    started = time.perf_counter()
                    for doc in docs:
                        rerank([doc])
                    return time.perf_counter() - started

                one_request(), rerank(docs[:1])  # load the model, warm both paths
                before = decodes(client, model)
                one_request()
                if before is not None:
                    print(f"one request of {args.documents} documents took {decodes(client, model) - before:.0f} "
                          "llama.cpp decodes")
                batched, singles, ratios = [], [], []
                for round_ in range(args.rounds):
                    if round_ % 2:
                        s, b = single_requests(), one_request()
                    else:
                        b, s = one_request(), single_requests()
                    batched.append(b), singles.append(s), ratios.append(s / b)
                    print(f"round {round_ + 1}: one request {b * 1000:.0f} ms, {args.documents} requests "
                          f"{s * 1000:.0f} ms, ratio {s / b:.2f}x")
        finally:
            stop(proc)
    print(f"median: one request {statistics.median(batched) * 1000:.0f} ms "
          f"({args.documents / statistics.median(batched):.0f} documents/s), {args.documents} single requests "
          f"{statistics.median(singles) * 1000:.0f} ms; ratio {statistics.median(ratios):.2f}x (target >= 3x)")


def decodes(client, model: str) -> float | None:
    """The GGUF reranker's llama_decode count so far (None for other backends)."""
    text = client.get("/metrics").text
    found = re.search(rf'^nexa_backend_rerank_decodes_total{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


if __name__ == "__main__":
    main()
