"""Structural-similarity reranking latency: top-100 per query over 7x7 patch grids of DeiT-S width (384).

    python benchmarks/structural.py [--quick] [--queries 8] [--k 100]

Compares, per query, (a) a straightforward loop scoring one candidate at a time, (b) the batched core
(all K candidates of a query in one optimal-transport call, as the reranker does) and (c) the actor
pool (one actor, candidates' patches read from a Lance table, then (b)). Random descriptors: the
Sinkhorn iteration count depends on them, so the three paths score the same pairs. The last line is JSON.
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

from rerank import random_table
from rrt_dist.config import RayConfig
from rrt_dist.pipelines.rerank import RerankPool
from rrt_dist.rerank.structural import structural_similarity
from rrt_dist.runtime import init_ray

GRID, DIM = 49, 384


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 queries, top-20")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()
    nq, k = (2, 20) if args.quick else (args.queries, args.k)
    work = Path(tempfile.mkdtemp(prefix="bench-structural-"))
    try:
        query_ids = np.arange(nq, dtype=np.int64) + 10**6
        gallery_ids = np.arange(k * nq, dtype=np.int64)
        qstore = random_table(str(work / "q.lance"), query_ids, 0, GRID, DIM, DIM)
        gstore = random_table(str(work / "g.lance"), gallery_ids, 1, GRID, DIM, DIM)
        ranked = gallery_ids.reshape(nq, k)
        scores = np.tile(np.linspace(1, 0, k, dtype=np.float32), (nq, 1))
        queries = qstore.take_locals(query_ids)
        cands = [gstore.take_locals(row) for row in ranked]

        start = time.perf_counter()
        looped = [np.concatenate([structural_similarity(queries["local"][q], queries["global"][q],
                                                        c["local"][i:i + 1], c["global"][i:i + 1])
                                  for i in range(k)]) for q, c in enumerate(cands)]
        loop_seconds = time.perf_counter() - start
        start = time.perf_counter()
        batched = [structural_similarity(queries["local"][q], queries["global"][q], c["local"], c["global"])
                   for q, c in enumerate(cands)]
        batched_seconds = time.perf_counter() - start

        init_ray(RayConfig())
        pool = RerankPool("structural", {}, qstore, [gstore], num_actors=1, chunk=nq)
        pool.rerank(query_ids[:1], ranked[:1, :2], scores[:1, :2], 2)          # warm-up: actor start
        start = time.perf_counter()
        pool.rerank(query_ids, ranked, scores, k)
        pool_seconds = time.perf_counter() - start
        pool.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # one candidate at a time stops Sinkhorn per pair, the batch for all K together: scores agree to the tolerance
    agreement = float(max(np.abs(a - b).max() for a, b in zip(looped, batched)))
    result = {"benchmark": "structural", "queries": nq, "k": k, "grid": GRID, "dim": DIM, "device": "cpu",
              "threads": torch.get_num_threads(),
              "loop_ms_per_query": round(1000 * loop_seconds / nq, 1),
              "batched_ms_per_query": round(1000 * batched_seconds / nq, 1),
              "pool_ms_per_query": round(1000 * pool_seconds / nq, 1),
              "speedup_batched_vs_loop": round(loop_seconds / batched_seconds, 2),
              "speedup_pool_vs_loop": round(loop_seconds / pool_seconds, 2),
              "max_score_difference_loop_vs_batched": round(agreement, 5)}
    print(f"per-candidate loop {result['loop_ms_per_query']} ms/query, batched {result['batched_ms_per_query']} "
          f"ms/query, actor pool {result['pool_ms_per_query']} ms/query")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
