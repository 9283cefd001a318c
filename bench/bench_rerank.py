"""Rerank benchmark: 64 documents in one request vs the same 64 as single requests.

One request lets the backend score the documents in batches (a cross-encoder's pairs, or
an embedding model's vectors for the cosine ranking); 64 requests pay 64 passes and 64
HTTP round trips. Target: the one request at least 3x faster. Both paths go to a real
`nexa serve` subprocess (its own NEXA_HOME) with plain JSON over loopback, in rounds of
alternating order; each round's ratio is computed within the round and the median printed.
Not a timed test: the lead records the figures in docs/benchmarks.md.

    python bench/bench_rerank.py                                   # all-MiniLM-L6-v2 (cosine path)
    python bench/bench_rerank.py --model ORG/CROSS-ENCODER --rounds 10 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, start_nexa, stop  # noqa: E402

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
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import httpx

    docs = documents(args.documents)
    print(machine())
    print(f"model {args.model}, {args.documents} documents of ~{len(docs[0].split())} words, {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="nexa-bench-rerank-") as home:
        proc, base = start_nexa(args.model, Path(home), threads=args.threads, ctx=512, gpu=None)
        try:
            with httpx.Client(base_url=base, timeout=600) as client:

                def rerank(batch: list[str]) -> None:
                    r = client.post("/v1/rerank", json={"model": args.model, "query": QUERY, "documents": batch})
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


if __name__ == "__main__":
    main()
