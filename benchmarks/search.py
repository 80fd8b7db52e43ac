"""Global search at R1M scale: the sharded Ray index (1 and 2 shards) vs plain in-process FAISS.

    python benchmarks/search.py [--quick] [--n 1000000] [--dim 128] [--factory IVF4096,Flat] [--params nprobe=64]

Synthetic clustered, L2-normalised vectors are written to a Lance feature table (float16, as
the pipeline stores them), indexed with the given factory, and searched with 1,000 queries
(k=100). Reports build time, index size, recall@100 against exact search (FAISS IndexFlatIP on
the same float16-rounded vectors), and queries/s of the in-process index and of the sharded
searcher with 1 and 2 shards. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from rrt_dist.config import RayConfig
from rrt_dist.index.core import new_index, train
from rrt_dist.index.sharded import ShardedIndex, build_index
from rrt_dist.runtime import init_ray
from rrt_dist.store import FeatureStore, commit_fragments, features_schema, features_to_table, write_fragment


def clustered(n: int, d: int, seed: int, centres: int = 1000, chunk: int = 100_000):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)).astype(np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = c[rng.integers(0, centres, m)] + 0.6 * rng.normal(size=(m, d)).astype(np.float32)
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def qps(search, queries, k, repeats=3) -> float:
    search(queries[:10], k)
    best = min(_timed(search, queries, k) for _ in range(repeats))
    return len(queries) / best


def _timed(search, queries, k) -> float:
    start = time.perf_counter()
    search(queries, k)
    return time.perf_counter() - start


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100k vectors")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--factory", default="IVF4096,Flat")
    parser.add_argument("--params", default="nprobe=64")
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    n = 100_000 if args.quick else args.n
    k = 100
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        uri = str(work / "gallery.lance")
        schema = features_schema(args.dim, 0, 0, "bench", {}, "bench")
        ids_all, start = [], time.perf_counter()
        for i, x in enumerate(clustered(n, args.dim, 0)):
            ids = np.arange(i * 100_000, i * 100_000 + len(x), dtype=np.int64) * 7919 + 13
            commit_fragments(uri, schema, write_fragment(uri, features_to_table(
                schema, ids, x, np.zeros((len(x), 0, 0)), None, None, np.zeros(len(x)))))
            ids_all.append(ids)
        write_seconds = time.perf_counter() - start
        store = FeatureStore(uri)
        ids, vectors = store.globals()
        queries = next(clustered(args.queries, args.dim, 1))

        exact = faiss.IndexFlatIP(args.dim)
        exact.add(vectors)
        _, truth_rows = exact.search(queries, k)
        truth = ids[truth_rows]
        del exact

        start = time.perf_counter()
        local = new_index(args.factory, args.dim)
        rng = np.random.default_rng(0)
        train(local, vectors[rng.choice(n, size=min(n, 200_000), replace=False)])
        local.add_with_ids(vectors, ids)
        local_build = time.perf_counter() - start
        faiss.ParameterSpace().set_index_parameters(local, args.params)
        local_recall = recall(local.search(queries, k)[1], truth)
        local_qps = qps(local.search, queries, k)
        index_bytes = faiss.serialize_index(local).nbytes
        del local

        init_ray(RayConfig())
        sharded = {}
        for shards in (1, 2):
            start = time.perf_counter()
            build_index(store, str(work / f"idx{shards}"), args.factory, shards)
            build_seconds = time.perf_counter() - start
            index = ShardedIndex(str(work / f"idx{shards}"), params=args.params)
            found = index.search(queries, k)[1]
            sharded[shards] = {"build_s": round(build_seconds, 1), "recall@100": round(recall(found, truth), 4),
                               "qps": round(qps(index.search, queries, k), 1)}
            index.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "search", "n": n, "dim": args.dim, "storage": "float16 in Lance, float32 in FAISS",
              "factory": args.factory, "params": args.params, "k": k, "queries": args.queries,
              "lance_write_s": round(write_seconds, 1), "index_mb": round(index_bytes / 2**20, 1),
              "peak_rss_gb": round(rss_gb(), 2),
              "in_process": {"build_s": round(local_build, 1), "recall@100": round(local_recall, 4),
                             "qps": round(local_qps, 1)},
              "sharded_1": sharded[1], "sharded_2": sharded[2],
              "qps_ratio_1_shard_vs_in_process": round(sharded[1]["qps"] / local_qps, 3),
              "qps_ratio_2_shards_vs_in_process": round(sharded[2]["qps"] / local_qps, 3)}
    print(f"in-process {result['in_process']}; 1 shard {sharded[1]}; 2 shards {sharded[2]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
