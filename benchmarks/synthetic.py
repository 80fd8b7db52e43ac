"""Synthetic benchmark generation: Ray tasks vs a plain in-process loop over the same plan.

    python benchmarks/synthetic.py [--quick]

Prints images/s of both and their ratio; the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray

from rrt_dist.config import RayConfig
from rrt_dist.datasets.generate import generate_synthetic
from rrt_dist.datasets.options import SyntheticSpec
from rrt_dist.datasets.synthetic import plan
from rrt_dist.config import available_cpus
from rrt_dist.runtime import init_ray


def timed(spec: SyntheticSpec, root: Path) -> float:
    start = time.perf_counter()
    generate_synthetic(spec, root)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small plan (seconds)")
    args = parser.parse_args()
    spec = SyntheticSpec(n_landmarks=12, n_val_landmarks=0, n_train_landmarks=20, n_distractors=200) if args.quick \
        else SyntheticSpec()
    n_images = len(plan(spec))
    work = Path(tempfile.mkdtemp(prefix="bench-synthetic-"))
    try:
        serial = timed(spec, work / "serial")
        init_ray(RayConfig())
        parallel = timed(spec, work / "ray")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "synthetic_generation", "images": n_images, "cpus": available_cpus(),
              "serial_img_per_s": round(n_images / serial, 1), "ray_img_per_s": round(n_images / parallel, 1),
              "speedup": round(serial / parallel, 3)}
    print(f"serial {result['serial_img_per_s']} img/s, Ray {result['ray_img_per_s']} img/s "
          f"on {result['cpus']} CPUs: x{result['speedup']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
