"""Extract a benchmark's descriptors into Lance feature tables (queries, gallery, distractors).

    rrt-dist extract                                     # synthetic benchmark, shipped-weights Lite0
    rrt-dist extract dataset=roxford5k dataset.root=/data/roxford5k dataset/distractors=r1m \
        dataset.distractors.root=/data/revisitop1m backbone=delg_r50 ray=cluster

Rerunning the same command after an interruption extracts only what is missing.
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

import rrt_dist.config  # noqa: F401  (registers the structured configs)
from rrt_dist.datasets import load_benchmark
from rrt_dist.pipelines.features import ensure_features, extract_settings
from rrt_dist.runtime import init_ray

log = logging.getLogger("rrt_dist.extract")


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> dict:
    init_ray(cfg.ray)
    bench = load_benchmark(cfg.dataset)
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    stores = ensure_features(bench, cfg.features_dir, cfg.backbone.name, options, extract_settings(cfg.backbone))
    tables = {name: {"uri": s.uri, "version": s.version, "rows": len(s), "fingerprint": s.fingerprint}
              for name, s in stores.items()}
    for name, t in tables.items():
        print(f"{name:<10} {t['rows']:>9} rows  version {t['version']:<4} {t['uri']}")
    return tables


if __name__ == "__main__":
    main()
