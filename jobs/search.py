"""Search a benchmark's queries in its sharded index and write the neighbours table.

    rrt-dist search                                         # synthetic benchmark, top-100
    rrt-dist search index.expand_queries=true               # with alpha-QE (reranker.aqe: n=2, alpha=0.3)

Output: ``<output_dir>/neighbours.parquet`` (query_id, neighbour_ids, scores; best first).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.index.sharded import write_neighbours
    from rrt_dist.pipelines.features import benchmark_features, global_matrix
    from rrt_dist.pipelines.index import ensure_index, indexed_tables, search
    from rrt_dist.store import take_globals_from

    bench, stores = benchmark_features(cfg)
    tables = [stores[n] for n in indexed_tables(cfg.index, stores)]
    index = ensure_index(cfg.index, bench.name, tables, OmegaConf.to_object(cfg.ray.search))
    query_ids, queries = global_matrix(stores, ["query"])
    k = cfg.index.neighbours
    start = time.perf_counter()
    scores, ids = search(index, queries, k, lambda ids: take_globals_from(tables, ids),
                         cfg.reranker.aqe if cfg.index.expand_queries else None)
    seconds = time.perf_counter() - start
    index.close()
    path = Path(cfg.output_dir) / "neighbours.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_neighbours(str(path), query_ids, ids, scores)
    print(f"{len(query_ids)} queries, top-{k} in {seconds:.2f}s ({len(query_ids) / max(seconds, 1e-9):.0f} q/s) "
          f"-> {path}")
    return {"neighbours": str(path), "queries": int(len(query_ids)), "k": int(k),
            "mean_top1": float(np.mean(scores[:, 0])) if len(scores) else None}


main = entry_point(run)

if __name__ == "__main__":
    main()
