"""Ray layer of the synthetic benchmark: render chunks of the plan in parallel tasks."""
from __future__ import annotations

import json
import logging
import os
from itertools import groupby
from pathlib import Path

import ray
from tqdm import tqdm

from rrt_dist.schema import SyntheticRootMismatch

from .options import SyntheticSpec
from .synthetic import plan, render_and_write, write_ground_truth

log = logging.getLogger(__name__)


def _chunks(items, size):
    """Chunks of about ``size`` images that keep a landmark's views together (one scene render each)."""
    chunk = []
    for _, group in groupby(items, key=lambda it: (it.split, it.landmark if it.split != "distractor" else -1)):
        for item in group:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def generate_synthetic(spec: SyntheticSpec, root: str | Path, chunk_size: int = 48, start_ray=None) -> dict:
    """Write the benchmark under ``root`` unless it is already there for this ``spec``.

    ``meta.json`` is written last, so an interrupted run is simply redone (renders are
    deterministic and files are replaced atomically). Uses Ray tasks when Ray is initialised,
    after calling ``start_ray`` (if given) once it is clear there is something to render.
    """
    root = Path(root)
    meta_path = root / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == spec.fingerprint():
            log.info("synthetic benchmark at %s is up to date (%s)", root, meta["fingerprint"])
            return meta
        raise SyntheticRootMismatch(
            f"{root} holds a synthetic benchmark generated with other settings (fingerprint {meta.get('fingerprint')}, "
            f"wanted {spec.fingerprint()}); choose another dataset.root or delete that folder")
    if start_ray is not None:
        start_ray()
    root.mkdir(parents=True, exist_ok=True)
    items = plan(spec)
    chunks = list(_chunks(items, chunk_size))
    metas = {}
    with tqdm(total=len(items), desc="render synthetic", unit="img", mininterval=2.0) as bar:
        if ray.is_initialized():
            task = ray.remote(num_cpus=1)(render_and_write)
            spec_ref = ray.put(spec)
            pending = {task.remote(spec_ref, str(root), chunk): len(chunk) for chunk in chunks}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    metas.update((m["name"], m) for m in ray.get(ref))
                    bar.update(pending.pop(ref))
        else:
            for chunk in chunks:
                metas.update((m["name"], m) for m in render_and_write(spec, str(root), chunk))
                bar.update(len(chunk))
    stats = write_ground_truth(spec, root, items, metas)
    meta = {"fingerprint": spec.fingerprint(), "spec": spec.__dict__, "stats": stats}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    log.info("synthetic benchmark written to %s: %s", root, stats)
    return meta
