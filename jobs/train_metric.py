"""Train a dense-grid extractor with a metric-learning loss on global + structural similarity (the
ViT-reranking paper's Tables 2 and 3) with Ray Train, then evaluate it on the test classes.

    rrt-dist train_metric experiment=ml_synthetic                      # synthetic landmarks, 2 CPU workers
    rrt-dist train_metric experiment=diml_r50 dataset=cub200 dataset.root=/data/cub200 \
        train.num_workers=4 ray=cluster                                   # Table 2, DIML-style ResNet-50
    rrt-dist train_metric experiment=diml_r50 dataset=cub200 dataset.root=/data/cub200 train=ml_ms
    rrt-dist train_metric ... train.name=my-run                           # rerun after a failure: resumes

Writes the best epoch's extractor (``backbone.pt``, ``local_projection.npz``, used as both projections:
extract with ``backbone.options.checkpoint=... local_projection=... global_projection=...``),
``training_curve.png`` and the evaluation report (``reranker.methods``: Global and Global + structural)
to the job's output folder; TensorBoard logs under the run's folder.
"""
from __future__ import annotations

from omegaconf import DictConfig, open_dict

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.pipelines.evaluate import check_evaluation, evaluate
    from rrt_dist.pipelines.train import train_metric

    check_evaluation(cfg)                 # before training, not after it
    training = train_metric(cfg, cfg.output_dir)
    with open_dict(cfg):
        cfg.backbone.options.update(training["backbone"])
    return {"training": training, "evaluation": evaluate(cfg, training)}


main = entry_point(run)

if __name__ == "__main__":
    main()
