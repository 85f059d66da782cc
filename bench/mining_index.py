"""Mining at corpus scale: the faiss index (``mine.index=faiss``) against exact search, side by side.

A synthetic corpus of unit vectors (1M x 768 by default) in two regimes (``REGIMES``): ``topics``, shaped
as text embedders place passages (fields, topics, a shared direction), and ``isotropic``, the worst case
for an inverted file; queries near corpus points (a perturbed passage, as a query is near its positive).  Exact
search is what ``ExactSearch`` does (every passage scored, chunks of 1,024 queries, float32 here as faiss
reads); the index is ``FaissSearch`` at the defaults and the other probes asked for.  Printed and
written to bench/results/mining_index.json: build and search seconds, queries per second, and recall@k of
the index's top k against the exact top k.

    python bench/mining_index.py                                   # 1M x 768, 10k queries (~8 min, 2 cores)
    python bench/mining_index.py --passages 100000 --queries 2000  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from harness import ROOT, record_header  # bench/harness.py, beside this script

from autoregembed.ground.atomic import atomic_write_text  # noqa: E402
from autoregembed.release.mining import ExactSearch, FaissSearch  # noqa: E402


REGIMES = {  # name -> (topics' spread around their field, passages' spread around their topic, shared direction)
    # 50 fields, 2,000 topics, a direction every embedding shares (anisotropy): mean pairwise cosine ~0.27,
    # a query's 10th neighbour at ~0.52, as text embedders place passages
    "topics": (1.0, 1.8, 1.5),
    # no structure beyond the query's own passage: neighbours barely closer than any passage (the worst case)
    "isotropic": (None, 2.0, 0.0),
}


def corpus_and_queries(n: int, m: int, dim: int, regime: str, seed: int = 0):
    """Unit vectors: passages drawn as ``REGIMES[regime]`` says; queries, passages moved a little (cosine
    ~0.87 to their own passage, as a query to its positive)."""
    topic_spread, spread, shared = REGIMES[regime]
    rng = np.random.default_rng(seed)
    if topic_spread is None:
        topics = np.zeros((1, dim), dtype=np.float32)
    else:
        fields = rng.standard_normal((50, dim), dtype=np.float32)
        topics = fields[rng.integers(0, 50, 2000)] + topic_spread * rng.standard_normal((2000, dim), dtype=np.float32)
    direction = shared * rng.standard_normal(dim, dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: one float64 temporary of the whole corpus would be 6 GB
        stop = min(n, start + 100_000)
        block = (topics[rng.integers(0, len(topics), stop - start)] + direction
                 + spread * rng.standard_normal((stop - start, dim), dtype=np.float32))
        x[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = x[rng.choice(n, m, replace=False)] + 0.02 * rng.standard_normal((m, dim), dtype=np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """ExactSearch's top k of every query, and the seconds it took."""
    search, out = ExactSearch(x), []
    t0 = time.perf_counter()
    for start in range(0, len(q), 1024):
        out += [ids[:k] for ids, _ in search.top(q[start : start + 1024], k)]
    return np.stack(out), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--regimes", default="topics,isotropic", help=f"of {', '.join(REGIMES)}")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--probes", default="8,32,128", help="index_probe values to measure (32 is the default)")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "mining_index.json"))
    args = ap.parse_args()
    record = {**record_header(), "passages": args.passages, "queries": args.queries, "dim": args.dim, "k": args.k,
              "threads": os.cpu_count(), "regimes": {}}
    for regime in args.regimes.split(","):
        record["regimes"][regime] = measure(regime, args)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    atomic_write_text(args.results, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.results}")


def measure(regime: str, args) -> dict:
    x, q = corpus_and_queries(args.passages, args.queries, args.dim, regime)
    tenth = float(np.mean(np.sort(q[:200] @ x.T, axis=1)[:, -10]))
    print(f"{regime}: corpus {x.shape}, queries {q.shape}, float32; a query's 10th neighbour at cosine {tenth:.3f}, "
          f"two passages at {float(np.mean(x[:1000] @ x[1000:2000].T)):.3f}", flush=True)
    exact, exact_s = exact_top(x, q, args.k)
    print(f"  exact: {exact_s:.1f} s ({len(q) / exact_s:,.0f} queries/s)", flush=True)
    t0 = time.perf_counter()
    index = FaissSearch(x)
    build_s = time.perf_counter() - t0
    print(f"  faiss IVF, {index.index.nlist} lists: built in {build_s:.1f} s", flush=True)
    rows = []
    for probe in (int(p) for p in args.probes.split(",")):
        index.index.nprobe = probe
        t0 = time.perf_counter()
        found = index.top(q, args.k)
        search_s = time.perf_counter() - t0
        recall = float(np.mean([len(set(e) & set(ids[: args.k])) / args.k for e, (ids, _) in zip(exact, found)]))
        rows.append({"probe": probe, "search_s": round(search_s, 2), "recall_at_k": round(recall, 4),
                     "exact_over_search": round(exact_s / search_s, 1),
                     "exact_over_build_and_search": round(exact_s / (build_s + search_s), 2)})
        print(f"  probe {probe:>4}: search {search_s:.2f} s, recall@{args.k} {recall:.4f}, exact / search "
              f"{exact_s / search_s:.1f}x, exact / (build + search) {exact_s / (build_s + search_s):.2f}x", flush=True)
    return {"tenth_neighbour_cosine": round(tenth, 3), "exact_s": round(exact_s, 1), "lists": index.index.nlist,
            "build_s": round(build_s, 1), "probes": rows}


if __name__ == "__main__":
    main()
