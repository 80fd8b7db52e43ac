"""Build a benchmark's sharded global index, or add the feature rows it does not hold yet.

    rrt-dist index                                          # synthetic benchmark, exact (Flat) index
    rrt-dist index index=ivf_pq dataset=roxford5k dataset/distractors=r1m ... ray=cluster

Rerunning after the feature tables changed (images added, re-extracted or removed) commits a new index
version holding exactly their rows: delta shards with the trained quantizer kept, or a rebuild past
index.rebuild_fraction; the manifest records the Lance versions indexed and, per version, what was done and why.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.pipelines.features import benchmark_features
    from rrt_dist.pipelines.index import ensure_index, indexed_tables

    bench, stores = benchmark_features(cfg)
    index = ensure_index(cfg.index, bench.name, [stores[n] for n in indexed_tables(cfg.index, stores)],
                         OmegaConf.to_object(cfg.ray.search))
    m = index.manifest
    print(f"index {index.directory} v{m.version}: {m.factory} ({m.choice or 'as configured'}), {m.ntotal} vectors of "
          f"dimension {m.dimension} in {len(m.shards)} shard(s); sources {m.sources}; {m.history[-1]['action']}: "
          f"{m.history[-1]['reason'] or '-'}")
    index.close()
    return {"directory": index.directory, "ntotal": m.ntotal, "factory": m.factory, "version": m.version}


main = entry_point(run)

if __name__ == "__main__":
    main()
