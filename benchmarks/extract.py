"""Extraction throughput: the Ray Data pipeline vs a plain in-process loop, same model and threads.

    python benchmarks/extract.py [--quick] [--images N]
    python benchmarks/extract.py --backbone delg_r50 --random-weights --cost-only --cost-size 1024 768

Both decode, crop, resize and extract the same images of the synthetic benchmark with a backbone preset
(default: the shipped-weights Lite0 multi-scale extractor, the demo's) and the same intra-op threads; the
pipeline also writes and commits the Lance table. ``ratio`` compares the pipeline's throughput
after start-up (Ray workers, actor, model load: a fixed cost per run, reported separately) with
the loop's (target >= 0.9 on a 2-core machine).

``--batching`` measures only the extractor itself: the same prepared images one at a time (the baseline: how
multi-scale extraction ran before it batched) against batches of ``--batch-size`` (one forward pass per scale for
the images of a size), alternating the two ``--repeats`` times; with ``--cost-size W H`` the images are first resized
to that size (a gallery's photos sharing a size), else they keep the synthetic views' sizes.

``--cost-size W H`` also measures the cost of one image of that size (synthetic views upscaled to it, e.g. the
1024 x 768 of Oxford / Paris / R1M photos): seconds per image here and the forward pass's GFLOP per image
(``torch.utils.flop_counter``), from which a GPU's time per image follows. ``--random-weights`` skips
downloading hub weights (the cost does not depend on them). The last line is JSON.
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
from rrt_dist.datasets import read_r1m, read_revisitop
from rrt_dist.datasets.generate import generate_synthetic
from rrt_dist.datasets.options import SyntheticSpec
from rrt_dist.features import create_extractor, create_preparer
from rrt_dist.features.core import extract_rows
from rrt_dist.pipelines.extract import extract_to_lance
from rrt_dist.config import available_cpus
from rrt_dist.runtime import init_ray
from rrt_dist.schema import ExtractSettings, PoolResources

REPO = Path(__file__).resolve().parent.parent


def image_cost(extractor, preparer, rows: list[dict], size: tuple[int, int]) -> dict:
    """Seconds and forward GFLOP per image of ``size`` (the rows' images resized to it), batches of one."""
    import cv2
    from torch.utils.flop_counter import FlopCounterMode

    from rrt_dist.features.images import load_image

    prepared = [preparer(cv2.resize(load_image(row["uri"], None), size, interpolation=cv2.INTER_CUBIC))
                for row in rows]
    extractor.extract(prepared[:1])                                # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        extractor.extract(prepared[:1])
    start = time.perf_counter()
    for p in prepared:
        extractor.extract([p])
    return {"cost_size": list(size), "cost_s_per_image": round((time.perf_counter() - start) / len(prepared), 3),
            "cost_gflop_per_image": round(counter.get_total_flops() / 1e9, 1)}


def batching_speed(extractor, preparer, rows: list[dict], batch_size: int, size: tuple[int, int] | None,
                   repeats: int) -> dict:
    """Images per second of ``extractor.extract`` one image at a time and in batches, on the same prepared images,
    the two alternated ``repeats`` times (other work on the machine disturbs both alike)."""
    import cv2

    from rrt_dist.features.images import load_image

    def rgb(row):
        image = load_image(row["uri"], None)
        return image if size is None else cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)

    prepared = [preparer(rgb(row)) for row in rows]
    extractor.extract(prepared[:batch_size])                       # warm-up
    seconds = {"one_at_a_time": 0.0, "batched": 0.0}
    for _ in range(repeats):
        start = time.perf_counter()
        for p in prepared:
            extractor.extract([p])
        seconds["one_at_a_time"] += time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(prepared), batch_size):
            extractor.extract(prepared[i:i + batch_size])
        seconds["batched"] += time.perf_counter() - start
    rates = {k: len(prepared) * repeats / v for k, v in seconds.items()}
    return {"sizes": len({p.image.shape for p in prepared}), "one_at_a_time_img_per_s": round(rates["one_at_a_time"], 2),
            "batched_img_per_s": round(rates["batched"], 2),
            "batched_ratio": round(rates["batched"] / rates["one_at_a_time"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 images")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data", default="data/bench-synthetic")
    parser.add_argument("--backbone", default="lite0_multiscale", help="a preset of configs/backbone")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--cost-size", type=int, nargs=2, metavar=("W", "H"))
    parser.add_argument("--cost-images", type=int, default=3)
    parser.add_argument("--cost-only", action="store_true", help="only the per-image cost (needs --cost-size)")
    parser.add_argument("--batching", action="store_true",
                        help="only the extractor: one image at a time against batches of --batch-size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = 64 if args.quick else args.images
    backbone = yaml.safe_load((REPO / f"configs/backbone/{args.backbone}.yaml").read_text())
    name, options = backbone["name"], dict(backbone["options"])
    if args.random_weights:
        options["pretrained"] = False
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
    if args.batching:
        speed = batching_speed(extractor, preparer, rows, args.batch_size,
                               tuple(args.cost_size) if args.cost_size else None, args.repeats)
        print(f"{args.backbone}: {speed['one_at_a_time_img_per_s']} img/s one at a time, {speed['batched_img_per_s']} "
              f"img/s in batches of {args.batch_size} (ratio {speed['batched_ratio']}; {speed['sizes']} sizes), "
              f"{threads} threads")
        print(json.dumps({"benchmark": "extract_batching", "backbone": args.backbone, "images": n, "threads": threads,
                          "batch_size": args.batch_size, "device": str(extractor.device),
                          "image_size": args.cost_size, **speed}))
        return
    cost = {}
    if args.cost_size:
        cost = image_cost(extractor, preparer, rows[:args.cost_images], tuple(args.cost_size))
        print(f"{args.backbone} at {args.cost_size[0]}x{args.cost_size[1]}: {cost['cost_gflop_per_image']} GFLOP, "
              f"{cost['cost_s_per_image']} s an image on {threads} threads")
    if args.cost_only:
        if not cost:
            parser.error("--cost-only needs --cost-size")
        print(json.dumps({"benchmark": "extract", "backbone": args.backbone, "threads": threads, **cost}))
        return
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
    result = {"benchmark": "extract", "backbone": args.backbone, "extractor": name, "model": options["model"], "images": n, "threads": threads,
              "loop_img_per_s": round(n / loop_seconds, 2),
              "ray_img_per_s": round(summary.steady_images_per_second, 2),
              "ray_startup_s": round(summary.startup_seconds, 1),
              "ray_img_per_s_incl_startup": round(summary.images_per_second, 2),
              "ratio": round(summary.steady_images_per_second / (n / loop_seconds), 3),
              "ratio_incl_startup": round(summary.images_per_second / (n / loop_seconds), 3), **cost}
    print(f"in-process loop {result['loop_img_per_s']} img/s; Ray Data pipeline {result['ray_img_per_s']} img/s after "
          f"{result['ray_startup_s']} s start-up (ratio {result['ratio']}; {result['ratio_incl_startup']} including "
          f"start-up), {threads} threads")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
