"""Extract a benchmark's descriptors into Lance feature tables (queries, gallery, distractors).

    rrt-dist extract                                     # synthetic benchmark, shipped-weights Lite0
    rrt-dist extract dataset=roxford5k dataset.root=/data/roxford5k dataset/distractors=r1m \
        dataset.distractors.root=/data/revisitop1m backbone=delg_r50 ray=cluster

Rerunning the same command after an interruption extracts only what is missing.
"""
from __future__ import annotations

from omegaconf import DictConfig

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.pipelines.features import benchmark_features, report_tables

    return report_tables(*benchmark_features(cfg))


main = entry_point(run)

if __name__ == "__main__":
    main()
