"""RRT training throughput: pairs/s for 1 vs 2 Ray Train workers, and where a step's time goes.

    python benchmarks/train.py [--quick] [--steps 12] [--max-local 64]

A DELG-shaped random table (2048-d globals, 500 locals of 128-d; 200 labels x 10 images, every image
an anchor) is trained for 2 epochs of ``--steps`` steps per worker with 12 triplets per worker-step:
in-process on all cores (the baseline), on 1 Ray Train worker holding all cores, and on 2 workers
(DDP over gloo) with one core each. The second epoch is measured (the first includes start-up).
``data`` is the time a step waited for its batch (the Lance take runs in a prefetch thread),
``compute`` forward + backward + all-reduce + optimizer step. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from rerank import random_table

from rrt_dist.config import RayConfig, TrainConfig
from rrt_dist.runtime import init_ray
from rrt_dist.schema import StageResources, TrainSettings
from rrt_dist.train.core import TripletBatches, build_model, epoch_triplets, train_step
from rrt_dist.train.distributed import fit


def random_rows(n_labels: int, per_label: int, k: int, seed: int) -> dict:
    """Labels and top-k lists where every image has its label's other images and random negatives."""
    rng = np.random.default_rng(seed)
    n = n_labels * per_label
    labels = np.arange(n) // per_label
    neighbours = np.empty((n, k), np.int64)
    for i in range(n):
        same = np.flatnonzero(labels == labels[i])
        same = same[same != i]
        others = rng.choice(np.flatnonzero(labels != labels[i]), k - len(same), replace=False)
        neighbours[i] = rng.permutation(np.concatenate([same, others]))
    return {"labels": labels, "neighbours": neighbours, "anchors": np.arange(n)}


def in_process(store, rows: dict, settings: TrainSettings, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = build_model(settings, store.global_dim, store.local_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batches = TripletBatches(store, rows["ids"], settings.top_locals)
    out = {}
    for epoch in range(2):
        triplets = epoch_triplets(rows["anchors"], rows["neighbours"], rows["labels"], settings, epoch, 0, 1)
        triplets = triplets[:steps * settings.batch_size]
        data = compute = 0.0
        start = time.perf_counter()
        for batch, waited in batches.epoch(triplets, settings.batch_size):
            t = time.perf_counter()
            train_step(model, optimizer, batch, settings.grad_clip)
            compute += time.perf_counter() - t
            data += waited
        wall = time.perf_counter() - start
        out = {"pairs_per_s": 2 * steps * settings.batch_size / wall, "data_s_per_step": data / steps,
               "compute_s_per_step": compute / steps}
    return out


def on_ray(store, rows: dict, settings: TrainSettings, steps: int, workers: int, cpus: int, storage: str) -> dict:
    n_anchors = steps * settings.batch_size * workers
    cfg = OmegaConf.structured(TrainConfig(num_workers=workers, storage_path=storage, keep_checkpoints=1))
    part = {**rows, "anchors": rows["anchors"][:n_anchors]}
    result = fit(cfg, store, part, None, f"bench-{workers}w-{time.time_ns()}", settings,
                 resources=StageResources(num_cpus=cpus // workers, num_gpus=0))
    if result.error:
        raise result.error
    return {k: result.metrics[k] for k in ("pairs_per_s", "data_s_per_step", "compute_s_per_step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 steps per epoch, 32 locals")
    parser.add_argument("--steps", type=int, default=12, help="steps per worker per epoch")
    parser.add_argument("--max-local", type=int, default=64, help="locals per image fed to RRT (of 500 stored)")
    args = parser.parse_args()
    steps, max_local = (4, 32) if args.quick else (args.steps, args.max_local)
    cpus = os.cpu_count() or 2
    init_ray(RayConfig(num_cpus=cpus))
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        rows = random_rows(200, 10, 100, seed=0)
        rows["ids"] = np.arange(len(rows["labels"]), dtype=np.int64) + 1
        store = random_table(str(work / "train.lance"), rows["ids"], seed=1)
        settings = TrainSettings(epochs=2, top_locals=max_local, grad_clip=0.1)
        results = {"baseline (in-process)": in_process(store, rows, settings, steps, cpus),
                   "ray 1 worker": on_ray(store, rows, settings, steps, 1, cpus, str(work / "runs")),
                   "ray 2 workers": on_ray(store, rows, settings, steps, 2, cpus, str(work / "runs"))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["baseline (in-process)"]["pairs_per_s"]
    print(f"RRT training, {max_local} of 500 locals per image, 12 triplets (24 pairs) per worker-step, {cpus} CPUs")
    for name, r in results.items():
        print(f"  {name:22s} {r['pairs_per_s']:7.1f} pairs/s  ({r['pairs_per_s'] / base:.2f}x)  "
              f"data {1000 * r['data_s_per_step']:.1f} ms/step, compute {1000 * r['compute_s_per_step']:.0f} ms/step")
    print(json.dumps({"benchmark": "train", "cpus": cpus, "max_local": max_local, "steps_per_epoch": steps,
                      "settings": asdict(settings), "results": results,
                      "ratio_2_workers_vs_1": results["ray 2 workers"]["pairs_per_s"] / results["ray 1 worker"]["pairs_per_s"],
                      "ratio_2_workers_vs_in_process": results["ray 2 workers"]["pairs_per_s"] / base}))


if __name__ == "__main__":
    main()
