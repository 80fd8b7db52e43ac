"""Evaluate retrieval on a benchmark: extract (if missing) -> search (± αQE) -> rerank (GV / RRT) -> metrics -> report.

    rrt-dist evaluate                                   # synthetic benchmark, embedded Ray
    rrt-dist evaluate experiment=demo                   # + RRT trained on its training split (make demo)
    rrt-dist evaluate dataset=roxford5k dataset.root=/data/roxford5k dataset/distractors=r1m \\
        dataset.distractors.root=/data/revisitop1m backbone=delg_r50 ray=cluster
"""
from __future__ import annotations

from omegaconf import DictConfig

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.pipelines.evaluate import evaluate

    return evaluate(cfg)


main = entry_point(run)

if __name__ == "__main__":
    main()
