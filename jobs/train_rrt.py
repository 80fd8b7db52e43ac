"""Train RRT on a dataset's training split with Ray Train (N workers), validating on its held-out split.

    rrt-dist train_rrt                                            # synthetic train split, 2 CPU workers
    rrt-dist train_rrt dataset=gldv2 dataset.root=/data/gldv2 backbone=delg_r50 index=ivf_pq \
        train.num_workers=8 train.storage_path=s3://bucket/rrt ray=cluster
    rrt-dist train_rrt train.name=my-run                          # rerun after a failure: resumes
    rrt-dist train_rrt dataset=sop dataset.root=/data/sop backbone=dense_grid_r50 train=rrt_sop_joint \
        train.num_workers=8 ray=cluster ray.train.num_cpus=4      # backbone + RRT from images (SOP, Table 6)

Writes ``rrt_best.pt`` (the best epoch by validation score; load with
``rrt_dist.models.load_released_checkpoint`` or pass as ``reranker.checkpoint``) and
``training_curve.png`` to the job's output folder; TensorBoard logs under the run's folder. Joint
training also writes the finetuned extractor (``backbone.pt``, ``local_projection.npz``).
"""
from __future__ import annotations

from omegaconf import DictConfig

from rrt_dist.runtime import entry_point


def run(cfg: DictConfig) -> dict:
    # imported here, after the config is composed and validated: a config error costs no torch, Ray or Lance
    from rrt_dist.pipelines.train import train_rrt

    return train_rrt(cfg, cfg.output_dir)


main = entry_point(run)

if __name__ == "__main__":
    main()
