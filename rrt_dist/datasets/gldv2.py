"""Google Landmarks v2: the retrieval benchmark and the RRT paper's training subset.

Layout (``root``)::

    index.csv                     id                      (761,757 gallery images)
    test.csv                      id[,...]                (query images)
    retrieval_solution_v2.1.csv   id,images,Usage         images: space-separated index ids or "None";
                                                          Usage: Public | Private | Ignored
    train_clean.csv               landmark_id,images      images: space-separated train ids
    {index,test,train}/a/b/c/abc....jpg                   first three characters of the id as folders

Ids are 16 hex digits; their 64 bits are used as the int64 image id.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rrt_dist.schema import DatasetLayoutError

from .base import Benchmark, GLDv2Protocol, make_manifest, read_csv

SOLUTION_LAYOUT = "retrieval_solution_v2.1.csv with columns id,images,Usage (images space-separated or None)"
INDEX_LAYOUT = "index.csv with column id (16 hex digits), images at index/a/b/c/<id>.jpg"
TEST_LAYOUT = "test.csv with column id (16 hex digits), images at test/a/b/c/<id>.jpg"
TRAIN_LAYOUT = "train_clean.csv with columns landmark_id,images (space-separated ids), images at train/a/b/c/<id>.jpg"


def gldv2_id(hex_id: str) -> int:
    """The image id as int64: the 64 bits of its 16 hex digits (two's complement)."""
    value = int(hex_id, 16)
    return value - (1 << 64) if value >= (1 << 63) else value


def image_path(root: Path, subset: str, hex_id: str) -> str:
    return str(root / subset / hex_id[0] / hex_id[1] / hex_id[2] / f"{hex_id}.jpg")


def _hex_ids(frame, path: Path, layout: str) -> list[str]:
    ids = frame["id"].astype(str).str.strip().tolist()
    bad = [i for i in ids if len(i) != 16 or any(c not in "0123456789abcdef" for c in i)]
    if bad:
        raise DatasetLayoutError(path, f"ids must be 16 lowercase hex digits, e.g. got {bad[:3]}", layout)
    return ids


def read_gldv2_retrieval(root: str | Path) -> Benchmark:
    root = Path(root)
    index_csv, test_csv = root / "index.csv", root / "test.csv"
    solution_csv = root / "retrieval_solution_v2.1.csv"
    index_ids = _hex_ids(read_csv(index_csv, INDEX_LAYOUT, ["id"], dtype=str), index_csv, INDEX_LAYOUT)
    test_ids = set(_hex_ids(read_csv(test_csv, TEST_LAYOUT, ["id"], dtype=str), test_csv, TEST_LAYOUT))
    solution = read_csv(solution_csv, SOLUTION_LAYOUT, ["id", "images", "Usage"], dtype=str, keep_default_na=False)
    position = {h: i for i, h in enumerate(index_ids)}
    queries, relevant, usage = [], [], []
    for row in solution.itertuples(index=False):
        if row.Usage == "Ignored":
            continue
        if row.Usage not in ("Public", "Private"):
            raise DatasetLayoutError(solution_csv, f"unknown Usage {row.Usage!r} for {row.id}", SOLUTION_LAYOUT)
        if row.id not in test_ids:
            raise DatasetLayoutError(solution_csv, f"query {row.id} is not in test.csv", SOLUTION_LAYOUT)
        images = row.images.split()
        unknown = [h for h in images if h not in position]
        if unknown or not images:
            raise DatasetLayoutError(solution_csv, f"query {row.id}: images {unknown[:3] or images} not in index.csv",
                                     SOLUTION_LAYOUT)
        queries.append(row.id)
        relevant.append({position[h] for h in images})
        usage.append(row.Usage)
    gallery = make_manifest([gldv2_id(h) for h in index_ids], [image_path(root, "index", h) for h in index_ids],
                            "gallery")
    query_manifest = make_manifest([gldv2_id(h) for h in queries], [image_path(root, "test", h) for h in queries],
                                   "query")
    return Benchmark(name="gldv2", queries=query_manifest, gallery=gallery,
                     protocol=GLDv2Protocol(relevant, usage), info={"root": str(root)})


def read_gldv2_train(root: str | Path, n_landmarks: int | None = 12000, min_images: int = 10,
                     max_images: int | None = 500, seed: int = 0):
    """Training manifest from ``train_clean.csv``; by default the RRT paper's subset.

    The paper samples 12,000 landmarks at random among those with at least 10 images, then at most
    500 images of each. ``n_landmarks=None`` keeps every eligible landmark, ``max_images=None`` every
    image. Sampling is seeded and independent of the CSV's row order.
    """
    root = Path(root)
    path = root / "train_clean.csv"
    frame = read_csv(path, TRAIN_LAYOUT, ["landmark_id", "images"], dtype={"landmark_id": np.int64, "images": str})
    landmarks = {int(row.landmark_id): row.images.split() for row in frame.itertuples(index=False)}
    eligible = sorted(lm for lm, ims in landmarks.items() if len(ims) >= min_images)
    rng = np.random.default_rng(seed)
    if n_landmarks is not None:
        if n_landmarks > len(eligible):
            raise ValueError(f"{path}: only {len(eligible)} landmarks have >= {min_images} images, "
                             f"cannot sample {n_landmarks}")
        eligible = sorted(rng.choice(eligible, size=n_landmarks, replace=False).tolist())
    ids, uris, labels = [], [], []
    for lm in eligible:
        images = sorted(landmarks[lm])
        if max_images is not None and len(images) > max_images:
            images = sorted(rng.choice(images, size=max_images, replace=False).tolist())
        ids += [gldv2_id(h) for h in images]
        uris += [image_path(root, "train", h) for h in images]
        labels += [lm] * len(images)
    return make_manifest(ids, uris, "train", labels=labels)
