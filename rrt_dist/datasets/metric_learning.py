"""Metric-learning benchmarks: Stanford Online Products, CUB-200-2011, Cars196.

Each split is used as both query and gallery set (leave-one-out), as in the metric-learning
protocol (Musgrave et al.) the ViT-reranking paper follows.

Layouts (``root``)::

    SOP       Ebay_train.txt, Ebay_test.txt   "image_id class_id super_class_id path" (header row)
    CUB200    images.txt "<id> <path>", image_class_labels.txt "<id> <class>", images/<path>
              classes 1-100 train, 101-200 test
    Cars196   cars_annos.mat: annotations(relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test)
              classes 1-98 train, 99-196 test (the official train/test flag is not used)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rrt_dist.schema import DatasetLayoutError

from .base import Benchmark, MetricLearningProtocol, make_manifest, read_csv, require_file, stable_id

SOP_LAYOUT = "Ebay_<split>.txt with header 'image_id class_id super_class_id path'"
CUB_LAYOUT = "images.txt '<id> <relative path>' and image_class_labels.txt '<id> <class 1-200>', images under images/"
CARS_LAYOUT = "cars_annos.mat with struct array 'annotations' (relative_im_path, class, ...)"


def _leave_one_out(name: str, root: Path, rel_paths, labels, split: str, image_dir: Path) -> Benchmark:
    manifest = make_manifest([stable_id(f"{name}/{p}") for p in rel_paths], [str(image_dir / p) for p in rel_paths],
                             split, labels=labels)
    return Benchmark(name=name, queries=manifest, gallery=manifest,
                     protocol=MetricLearningProtocol(np.asarray(labels, dtype=np.int64)), exclude_self=True,
                     info={"root": str(root), "split": split})


def _check_split(split: str):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def read_sop(root: str | Path, split: str = "test") -> Benchmark:
    _check_split(split)
    root = Path(root)
    frame = read_csv(root / f"Ebay_{split}.txt", SOP_LAYOUT, ["image_id", "class_id", "super_class_id", "path"],
                     sep=r"\s+")
    return _leave_one_out("sop", root, frame["path"].tolist(), frame["class_id"].astype(np.int64).tolist(), split, root)


def read_cub200(root: str | Path, split: str = "test") -> Benchmark:
    _check_split(split)
    root = Path(root)
    images = read_csv(root / "images.txt", CUB_LAYOUT, ["id", "path"], sep=r"\s+", header=None, names=["id", "path"])
    labels = read_csv(root / "image_class_labels.txt", CUB_LAYOUT, ["id", "label"], sep=r"\s+", header=None,
                      names=["id", "label"])
    frame = images.merge(labels, on="id", how="left", validate="one_to_one")
    if frame["label"].isna().any():
        raise DatasetLayoutError(root / "image_class_labels.txt", "some image ids have no class", CUB_LAYOUT)
    frame = frame[(frame["label"] <= 100) == (split == "train")]
    return _leave_one_out("cub200", root, frame["path"].tolist(), frame["label"].astype(np.int64).tolist(), split,
                          root / "images")


def read_cars196(root: str | Path, split: str = "test") -> Benchmark:
    from scipy.io import loadmat

    _check_split(split)
    root = Path(root)
    path = require_file(root / "cars_annos.mat", CARS_LAYOUT)
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
        annotations = np.atleast_1d(mat["annotations"])
        rows = [(str(a.relative_im_path), int(a.__dict__["class"])) for a in annotations]
    except Exception as err:  # noqa: BLE001
        raise DatasetLayoutError(path, f"cannot read annotations ({err})", CARS_LAYOUT) from err
    rows = [(p, c) for p, c in rows if (c <= 98) == (split == "train")]
    return _leave_one_out("cars196", root, [p for p, _ in rows], [c for _, c in rows], split, root)
