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
from rrt_dist.datasets import load_benchmark
from rrt_dist.pipelines.features import ensure_features, extract_settings
from rrt_dist.pipelines.index import ensure_index
from rrt_dist.runtime import init_ray


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> dict:
    init_ray(cfg.ray)
    bench = load_benchmark(cfg.dataset)
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    stores = ensure_features(bench, cfg.features_dir, cfg.backbone.name, options, extract_settings(cfg.backbone))
    tables = [stores["gallery"]] + ([stores["distractor"]] if cfg.index.with_distractors and "distractor" in stores
                                    else [])
    index = ensure_index(cfg.index, bench.name, tables)
    m = index.manifest
    print(f"index {index.directory}: {m.factory} ({m.choice or 'as configured'}), {m.ntotal} vectors of dimension "
          f"{m.dimension} in {len(m.shards)} shard(s); sources {m.sources}")
    index.close()
    return {"directory": index.directory, "ntotal": m.ntotal, "factory": m.factory}


if __name__ == "__main__":
    main()
