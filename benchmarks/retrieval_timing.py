"""Retrieval time of the keyframe database at 1k / 10k / 100k keyframes (synthetic unit vectors).

    python benchmarks/retrieval_timing.py [--sizes 1000 10000 100000] [--dim 256] [--queries 200] [--bow]

VLAD: faiss IndexFlatIP (exact) + IDSelectorBitmap excluding the recent keyframes, per single query as
the engine issues them. --bow: the DBoW2-style inverted file with 4096 words, ~300 words per keyframe.
Synthetic descriptors are fine here: flat search time does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from feature_matching_ros.retrieval.database import Keyframe, KeyframeDatabase, RetrievalConfig

EMPTY_KP = np.zeros((0, 2), np.float32)


def _keyframes(vectors: np.ndarray) -> list[Keyframe]:
    return [Keyframe(i, i * 100_000_000, EMPTY_KP, np.zeros((0, 32), np.uint8), np.zeros(0, np.float16), (640, 480),
                     "x", np.eye(3), v) for i, v in enumerate(vectors)]


def _bow_vectors(rng, n: int, words: int) -> np.ndarray:
    out = np.zeros((n, words), np.float32)
    for row in out:
        idx = rng.integers(0, words, 300)
        np.add.at(row, idx, rng.uniform(0.5, 2, 300).astype(np.float32))
        row /= row.sum()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--bow", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    import faiss

    rows = []
    for size in args.sizes:
        config = RetrievalConfig(top_k=args.top_k, exclude_recent_seconds=10.0, exclude_recent_count=20)
        if args.bow:
            dim = 4096
            database = KeyframeDatabase("bow", dim, config)
            vectors = _bow_vectors(rng, size, dim)
            queries = _bow_vectors(rng, args.queries, dim)
        else:
            dim = args.dim
            database = KeyframeDatabase("vlad", dim, config)
            vectors = rng.normal(size=(size, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            queries = vectors[rng.integers(0, size, args.queries)] + rng.normal(0, 0.05, (args.queries, dim)).astype(
                np.float32)
        start = time.perf_counter()
        database.add_many(_keyframes(vectors))
        build_s = time.perf_counter() - start
        database.query(queries[0], query_stamp_ns=size * 100_000_000)  # warm-up (BoW merges its tail here)
        times = []
        for query in queries:
            start = time.perf_counter()
            database.query(query, query_stamp_ns=size * 100_000_000)
            times.append((time.perf_counter() - start) * 1e3)
        times = np.array(times)
        row = {"keyframes": size, "kind": database.kind, "dim": dim, "build_s": round(build_s, 3),
               "query_ms_p50": round(float(np.percentile(times, 50)), 3),
               "query_ms_p90": round(float(np.percentile(times, 90)), 3),
               "query_ms_mean": round(float(times.mean()), 3), "faiss_threads": faiss.omp_get_max_threads()}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
