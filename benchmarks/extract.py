"""Extraction throughput: the Ray Data pipeline vs a plain in-process loop, same model and threads.

    python benchmarks/extract.py [--quick] [--images N] [--backbone-options JSON]

Both decode, crop, resize and extract the same images of the synthetic benchmark with the
shipped-weights Lite0 multi-scale extractor (the demo's) and the same intra-op threads; the
pipeline also writes and commits the Lance table. ``ratio`` compares the pipeline's throughput
after start-up (Ray workers, actor, model load: a fixed cost per run, reported separately) with
the loop's (target >= 0.9 on a 2-core machine); the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from rrt_dist.config import RayConfig
from rrt_dist.datasets import read_revisitop, read_r1m
from rrt_dist.datasets.generate import generate_synthetic
from rrt_dist.datasets.synthetic import SyntheticSpec
from rrt_dist.features import create_extractor, create_preparer
from rrt_dist.features.core import extract_rows
from rrt_dist.pipelines.extract import ExtractSettings, extract_to_lance
from rrt_dist.runtime import PoolResources, available_cpus, init_ray

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 images")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data", default="data/bench-synthetic")
    args = parser.parse_args()
    n = 64 if args.quick else args.images
    backbone = yaml.safe_load((REPO / "configs/backbone/lite0_multiscale.yaml").read_text())
    name, options = backbone["name"], backbone["options"]
    threads = available_cpus()

    spec = SyntheticSpec(n_landmarks=20, n_val_landmarks=0, n_train_landmarks=0, n_distractors=1000)
    if n > 160 + spec.n_distractors:
        parser.error(f"at most {160 + spec.n_distractors} images")
    generate_synthetic(spec, args.data)
    bench = read_revisitop(args.data, "synthetic", read_r1m(Path(args.data) / "distractors"))
    manifest = bench.gallery.slice(0, n)
    rows = manifest.select(["id", "uri", "bbox"]).to_pylist()

    torch.set_num_threads(threads)
    extractor = create_extractor(name, **options)
    preparer = create_preparer(name, **options)
    extract_rows(extractor, preparer, rows[:4], args.batch_size)  # warm-up
    start = time.perf_counter()
    ids, _, errors = extract_rows(extractor, preparer, rows, args.batch_size)
    loop_seconds = time.perf_counter() - start
    assert len(ids) == n and not errors

    init_ray(RayConfig())
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        summary = extract_to_lance(manifest, work / "features.lance", name, options,
                                   ExtractSettings(batch_size=args.batch_size),
                                   resources=PoolResources(intra_op_threads=threads))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "extract", "extractor": name, "model": options["model"], "images": n, "threads": threads,
              "loop_img_per_s": round(n / loop_seconds, 2),
              "ray_img_per_s": round(summary.steady_images_per_second, 2),
              "ray_startup_s": round(summary.startup_seconds, 1),
              "ray_img_per_s_incl_startup": round(summary.images_per_second, 2),
              "ratio": round(summary.steady_images_per_second / (n / loop_seconds), 3),
              "ratio_incl_startup": round(summary.images_per_second / (n / loop_seconds), 3)}
    print(f"in-process loop {result['loop_img_per_s']} img/s; Ray Data pipeline {result['ray_img_per_s']} img/s after "
          f"{result['ray_startup_s']} s start-up (ratio {result['ratio']}; {result['ratio_incl_startup']} including "
          f"start-up), {threads} threads")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
