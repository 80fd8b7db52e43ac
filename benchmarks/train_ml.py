"""Metric-learning training throughput: images/s with 1 vs 2 Ray Train workers, and per step the time spent
waiting for data (Ray Data decode + augmentation) vs computing (forward, structural similarity over the
gathered batch, backward, all-reduce), on the ``ml_synthetic`` setting (Lite0 at 128 px, batches of 32).

    python benchmarks/train_ml.py [--epochs 2] [--loss margin] [--work DIR]

Each configuration trains a fresh run for ``--epochs`` epochs; the first epoch (Ray Data and DDP warm-up) is
left out of the rates when there are more. The last line is JSON with the 2-vs-1 ratio.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(work: Path, workers: int, epochs: int, loss: str) -> dict:
    from hydra import compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401
    from rrt_dist.pipelines.train import train_metric

    name = f"throughput-{workers}w"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=ml_synthetic", f"train.num_workers={workers}",
                                           f"train.epochs={epochs}", f"train.metric.loss={loss}",
                                           f"train.name={name}", f"train.storage_path={work / 'runs'}",
                                           f"output_dir={work / name}"])
    history = train_metric(cfg, cfg.output_dir)["history"]
    timed = history[1:] or history
    mean = lambda key: sum(h[key] for h in timed) / len(timed)                          # noqa: E731
    return {"workers": workers, "images_per_s": round(mean("images_per_s"), 2),
            "data_s_per_step": round(mean("data_s_per_step"), 3),
            "compute_s_per_step": round(mean("compute_s_per_step"), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--loss", default="margin")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench-train-ml")
    args = parser.parse_args()
    rows = [run(args.work, workers, args.epochs, args.loss) for workers in (1, 2)]
    print("| workers | images/s | data s/step | compute s/step |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['images_per_s']} | {r['data_s_per_step']} | {r['compute_s_per_step']} |")
    print(json.dumps({"rows": rows, "speedup_2_vs_1": round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 3)}))


if __name__ == "__main__":
    main()
