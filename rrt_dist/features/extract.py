"""Global descriptors for a manifest, in parallel Ray tasks (in-process when Ray is off).

Unreadable images are returned as errors with their reason and left out of the result.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from .images import ImageError, load_image

log = logging.getLogger(__name__)


@dataclass
class GlobalFeatures:
    ids: np.ndarray          # [N] int64
    vectors: np.ndarray      # [N, d] float32, L2-normalised
    errors: dict             # id -> reason

    def subset(self, ids: np.ndarray) -> "GlobalFeatures":
        keep = np.isin(self.ids, ids)
        return GlobalFeatures(self.ids[keep], self.vectors[keep], self.errors)


def describe_rows(extractor_name: str, extractor_cfg: dict, rows: list[dict]) -> tuple[list, np.ndarray, dict]:
    from . import create_extractor

    extractor = create_extractor(extractor_name, **extractor_cfg)
    ids, images, errors = [], [], {}
    for row in rows:
        try:
            images.append(load_image(row["uri"], row.get("bbox")))
            ids.append(row["id"])
        except ImageError as err:
            errors[row["id"]] = str(err)
    return ids, extractor(images)["global"], errors


def extract_globals(manifest: pa.Table, extractor_name: str, extractor_cfg: dict | None = None,
                    chunk_size: int = 128, desc: str = "extract") -> GlobalFeatures:
    extractor_cfg = extractor_cfg or {}
    rows = manifest.select(["id", "uri", "bbox"]).to_pylist()
    chunks = [rows[i:i + chunk_size] for i in range(0, len(rows), chunk_size)]
    results = []
    with tqdm(total=len(rows), desc=desc, unit="img", mininterval=2.0) as bar:
        if ray.is_initialized():
            task = ray.remote(num_cpus=1)(describe_rows)
            pending = {task.remote(extractor_name, extractor_cfg, c): len(c) for c in chunks}
            order = list(pending)
            done_refs = {}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    done_refs[ref] = ray.get(ref)
                    bar.update(pending.pop(ref))
            results = [done_refs[ref] for ref in order]
        else:
            for c in chunks:
                results.append(describe_rows(extractor_name, extractor_cfg, c))
                bar.update(len(c))
    ids = np.asarray([i for r in results for i in r[0]], dtype=np.int64)
    vectors = np.concatenate([r[1] for r in results]) if results else np.zeros((0, 0), np.float32)
    errors = {k: v for r in results for k, v in r[2].items()}
    for image_id, reason in list(errors.items())[:5]:
        log.warning("skipped image %d: %s", image_id, reason)
    return GlobalFeatures(ids, vectors.astype(np.float32), errors)
