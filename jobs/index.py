"""Build a benchmark's sharded global index, or add the feature rows it does not hold yet.

    rrt-dist index                                          # synthetic benchmark, exact (Flat) index
    rrt-dist index index=ivf_pq dataset=roxford5k dataset/distractors=r1m ... ray=cluster

Rerunning after new rows were appended to the feature tables (a new gallery, or images added)
adds them without a rebuild; the manifest records the Lance versions indexed.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

import rrt_dist.config  # noqa: F401  (registers the structured configs)
from rrt_dist.runtime import job
from rrt_dist.pipelines.features import benchmark_features
from rrt_dist.pipelines.index import ensure_index, indexed_tables


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
@job
def main(cfg: DictConfig) -> dict:
    bench, stores = benchmark_features(cfg)
    index = ensure_index(cfg.index, bench.name, [stores[n] for n in indexed_tables(cfg.index, stores)],
                         OmegaConf.to_object(cfg.ray.search))
    m = index.manifest
    print(f"index {index.directory}: {m.factory} ({m.choice or 'as configured'}), {m.ntotal} vectors of dimension "
          f"{m.dimension} in {len(m.shards)} shard(s); sources {m.sources}")
    index.close()
    return {"directory": index.directory, "ntotal": m.ntotal, "factory": m.factory}


if __name__ == "__main__":
    main()
