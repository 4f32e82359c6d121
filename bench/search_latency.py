"""Search latency of ``dreamlip serve``'s indexes against a brute-force numpy top-k, in one run.

10^5 random unit vectors (the collection) and single-vector queries, as the server answers one
request: the baseline is ``E @ q`` plus ``argpartition`` and a sort of the k best; ours are
:class:`ExactIndex` on the matrix in memory and memory-mapped from a ``.npy`` file (how the
server reads its cache), and :class:`FaissIndex` when faiss is installed. Queries go round the
variants in turn so machine noise hits all alike; every variant's ids are checked equal to the
baseline's. Prints p50/p99 in milliseconds and each p50 and p99 as a ratio to the baseline's.

    python bench/search_latency.py                      # 10^5 x 512, k = 10, 300 queries
    python bench/search_latency.py --n 1000000 --dim 768 --queries 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dreamlip.serve.index import ExactIndex, FaissIndex, faiss_available


def brute_force(embeddings: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = embeddings @ query[0]
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="collection size")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    embeddings = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    queries = rng.standard_normal((args.warmup + args.queries, 1, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=2, keepdims=True)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embeddings.npy"
        np.save(path, embeddings)
        variants = {
            "numpy brute force (baseline)": lambda q: brute_force(embeddings, q, args.k),
            "ExactIndex, in memory": ExactIndex(embeddings),
            "ExactIndex, memory-mapped": ExactIndex(np.load(path, mmap_mode="r")),
        }
        if faiss_available():
            variants["FaissIndex (IndexFlatIP)"] = FaissIndex(embeddings)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for n, query in enumerate(queries):
            expected = None
            for name, variant in variants.items():
                search = variant if callable(variant) else (lambda q, v=variant: v.search(q, args.k)[1][0])
                start = time.perf_counter()
                ids = search(query)
                elapsed = time.perf_counter() - start
                if expected is None:
                    expected = ids
                elif not np.array_equal(ids, expected):
                    raise SystemExit(f"{name}: query {n} returned other ids than the baseline")
                if n >= args.warmup:
                    times[name].append(elapsed * 1e3)

    base = times["numpy brute force (baseline)"]
    base_p50, base_p99 = np.percentile(base, 50), np.percentile(base, 99)
    print(f"{args.n} x {args.dim} float32, k = {args.k}, {args.queries} single-vector queries")
    print(f"{'variant':32s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50/base':>9s} {'p99/base':>9s}")
    summary = {}
    for name, values in times.items():
        p50, p99 = np.percentile(values, 50), np.percentile(values, 99)
        print(f"{name:32s} {p50:8.2f} {p99:8.2f} {p50 / base_p50:9.2f} {p99 / base_p99:9.2f}")
        summary[name] = {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "p50_ratio": round(p50 / base_p50, 3)}
    print(json.dumps({"n": args.n, "dim": args.dim, "k": args.k, "results": summary}))


if __name__ == "__main__":
    main()
