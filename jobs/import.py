"""Import a benchmark's released descriptor files (the RRT paper's DELG features) into the Lance feature tables
``evaluate`` reads: no images, no model, Ray Data tasks reading the files.

    rrt-dist import experiment=rrt_paper_roxford dataset.root=/data/roxford5k     # <root>/delg_r50_gldv2/*.delg_*
    rrt-dist import experiment=rrt_paper_roxford dataset.root=/data/roxford5k \
        dataset/distractors=r1m dataset.distractors.root=/data/revisitop1m ray=cluster

Rerunning the same command after an interruption reads only what is missing (and what changed); an image
whose files are missing is recorded with the reason, and scores as a miss.
"""
from __future__ import annotations

from omegaconf import DictConfig

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.pipelines.features import imported_features, report_tables

    return report_tables(*imported_features(cfg))


main = entry_point(run)

if __name__ == "__main__":
    main()
