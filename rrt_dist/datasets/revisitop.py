"""Revisited Oxford5k / Paris6k and the R1M distractor set, in their official on-disk layouts.

Layout (``root``)::

    gnd_<name>.pkl       dict: imlist [names], qimlist [names],
                         gnd [{bbx: [x1, y1, x2, y2], easy: [..], hard: [..], junk: [..]}]
                         (indices into imlist)
    jpg/<name>.jpg       gallery and query images

R1M (``distractors_root``)::

    revisitop1m.txt      one image per line, path relative to jpg/ (".jpg" appended if absent)
    jpg/...              the images

Distractors are appended after the gallery, so revisitop gallery indices stay valid; they are
never positive or junk.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from rrt_dist.schema import DatasetLayoutError

from .base import (Benchmark, RevisitopProtocol, concat_manifests, load_ground_truth_pickle, make_manifest,
                   require_file, stable_id)

GND_LAYOUT = ("gnd_<name>.pkl with keys imlist, qimlist, gnd (list of {bbx, easy, hard, junk}) "
              "and images in jpg/<imlist entry>.jpg")
R1M_LAYOUT = "revisitop1m.txt (one image path per line, relative to jpg/) and the images under jpg/"


def read_revisitop(root: str | Path, name: str, distractors=None) -> Benchmark:
    """Read ``gnd_<name>.pkl``; ``distractors`` is a manifest to append (see :func:`read_r1m`)."""
    root = Path(root)
    gnd_path = require_file(root / f"gnd_{name}.pkl", GND_LAYOUT)
    try:
        cfg = load_ground_truth_pickle(gnd_path)
    except Exception as err:  # noqa: BLE001
        raise DatasetLayoutError(gnd_path, f"cannot unpickle ({err})", GND_LAYOUT) from err
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        found = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise DatasetLayoutError(gnd_path, f"expected keys imlist, qimlist, gnd; found {found}", GND_LAYOUT)
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise DatasetLayoutError(gnd_path, f"{len(qimlist)} queries but {len(gnd)} gnd entries", GND_LAYOUT)
    clean = []
    for q, entry in enumerate(gnd):
        missing = {"bbx", "easy", "hard", "junk"} - set(entry)
        if missing:
            raise DatasetLayoutError(gnd_path, f"gnd[{q}] lacks {sorted(missing)}", GND_LAYOUT)
        lists = {k: np.asarray(entry[k], dtype=np.int64).reshape(-1) for k in ("easy", "hard", "junk")}
        for key, idx in lists.items():
            if len(idx) and (idx.min() < 0 or idx.max() >= len(imlist)):
                raise DatasetLayoutError(gnd_path, f"gnd[{q}][{key!r}] indexes outside imlist", GND_LAYOUT)
        clean.append({**lists, "bbx": [float(v) for v in entry["bbx"]]})

    def uri(im):
        return str(root / "jpg" / f"{im}.jpg")

    gallery = make_manifest([stable_id(f"jpg/{im}.jpg") for im in imlist], [uri(im) for im in imlist], "gallery")
    queries = make_manifest([stable_id(f"jpg/{q}.jpg") for q in qimlist], [uri(q) for q in qimlist], "query",
                            bboxes=[g["bbx"] for g in clean])
    if distractors is not None:
        gallery = concat_manifests([gallery, distractors])
    return Benchmark(name=name, queries=queries, gallery=gallery, protocol=RevisitopProtocol(clean),
                     info={"root": str(root), "n_gallery": len(imlist)})


def read_r1m(root: str | Path, limit: int | None = None) -> pa.Table:
    """The R1M distractor manifest; ``limit`` keeps the first N lines (ids don't depend on it)."""
    root = Path(root)
    listing = require_file(root / "revisitop1m.txt", R1M_LAYOUT)
    names = []
    with open(listing) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            names.append(line if Path(line).suffix else f"{line}.jpg")
            if limit is not None and len(names) >= limit:
                break
    if not names:
        raise DatasetLayoutError(listing, "no image listed", R1M_LAYOUT)
    return make_manifest([stable_id(f"revisitop1m/{n}") for n in names], [str(root / "jpg" / n) for n in names],
                         "distractor")
