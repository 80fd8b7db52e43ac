"""RRT reranking latency: top-100 per query with 500 locals (DELG configuration).

    python benchmarks/rerank.py [--quick] [--queries 4] [--k 100]

Compares the actor-pool path (one batched forward pass per query over its K candidates, chunked)
with the reference loop of the original evaluation code (one forward pass per rank position,
batching that position over all queries), on random DELG-shaped feature tables and random RRT
weights (latency does not depend on the weights). Reports seconds per query and GFLOP/s
against the model's 7.05 GFLOP per pair. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rrt_dist.config import RayConfig
from rrt_dist.models.rrt import RerankingTransformer
from rrt_dist.pipelines.rerank import RerankPool
from rrt_dist.runtime import init_ray
from rrt_dist.store import FeatureStore, commit_fragments, features_schema, features_to_table, write_fragment

GFLOP_PER_PAIR = 7.05   # 6 layers over 2 x (500 + 2) tokens, d=128, MLP 1024; remap 2048->128


def random_table(uri: str, ids: np.ndarray, seed: int, n_local: int = 500, global_dim: int = 2048,
                 local_dim: int = 128) -> FeatureStore:
    rng = np.random.default_rng(seed)
    n = len(ids)
    schema = features_schema(global_dim, local_dim, n_local, "random-delg", {}, "bench")
    table = features_to_table(schema, ids, rng.normal(size=(n, global_dim)), rng.normal(size=(n, n_local, local_dim)),
                              rng.uniform(0, 500, (n, n_local, 2)), rng.integers(0, 7, (n, n_local)),
                              np.full(n, n_local))
    commit_fragments(uri, schema, write_fragment(uri, table))
    return FeatureStore(uri)


def reference_loop(model, queries: dict, cands: list[dict], k: int) -> float:
    """The original evaluation: for each rank position, one forward over all queries' candidates there."""
    start = time.perf_counter()
    with torch.inference_mode():
        src = [torch.as_tensor(queries[n]) for n in ("global", "local", "mask", "scales")]
        for j in range(k):
            tgt = [torch.as_tensor(np.stack([c[n][j] for c in cands])) for n in ("global", "local", "mask", "scales")]
            model(src[0], src[1], src[2], src[3].long(), tgt[0], tgt[1], tgt[2], tgt[3].long())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 queries, top-20")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()
    nq, k = (2, 20) if args.quick else (args.queries, args.k)
    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    try:
        query_ids = np.arange(nq, dtype=np.int64) + 10**6
        gallery_ids = np.arange(k * nq, dtype=np.int64)
        qstore = random_table(str(work / "q.lance"), query_ids, 0)
        gstore = random_table(str(work / "g.lance"), gallery_ids, 1)
        torch.manual_seed(0)
        torch.save(RerankingTransformer().state_dict(), work / "rrt.pth")
        ranked = gallery_ids.reshape(nq, k)
        scores = np.tile(np.linspace(1, 0, k, dtype=np.float32), (nq, 1))

        init_ray(RayConfig())
        pool = RerankPool("rrt", {"checkpoint": str(work / "rrt.pth")}, qstore, [gstore], num_actors=1, chunk=nq)
        pool.rerank(query_ids[:1], ranked[:1, :2], scores[:1, :2], 2)          # warm-up: actor + model load
        start = time.perf_counter()
        pool.rerank(query_ids, ranked, scores, k)
        pool_seconds = time.perf_counter() - start
        pool.close()

        from rrt_dist.models.rrt import load_released_checkpoint

        model = load_released_checkpoint(work / "rrt.pth")
        queries = qstore.take_locals(query_ids)
        cands = [gstore.take_locals(row) for row in ranked]
        reference_loop(model, {n: v[:1] for n, v in queries.items()}, [{n: v[:1] for n, v in c.items()}
                                                                         for c in cands[:1]], 1)   # warm-up
        ref_seconds = reference_loop(model, queries, cands, k)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pairs = nq * k
    result = {"benchmark": "rerank", "queries": nq, "k": k, "locals": 500, "device": "cpu",
              "threads": torch.get_num_threads(),
              "pool_s_per_query": round(pool_seconds / nq, 3), "reference_s_per_query": round(ref_seconds / nq, 3),
              "pool_gflops": round(pairs * GFLOP_PER_PAIR / pool_seconds, 1),
              "reference_gflops": round(pairs * GFLOP_PER_PAIR / ref_seconds, 1),
              "speedup_vs_reference": round(ref_seconds / pool_seconds, 3)}
    print(f"actor pool {result['pool_s_per_query']} s/query ({result['pool_gflops']} GFLOP/s), reference loop "
          f"{result['reference_s_per_query']} s/query ({result['reference_gflops']} GFLOP/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
