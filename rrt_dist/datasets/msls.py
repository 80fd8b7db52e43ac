"""Mapillary Street-level Sequences (MSLS), image-to-image place recognition.

Layout (``root``)::

    train_val/<city>/{query,database}/
        raw.csv             ,key,lon,lat,ca,captured_at,pano
        postprocessed.csv   ,key,easting,northing,...     (UTM, metres)
        subtask_index.csv   ,key,all,s2w,w2s,o2n,n2o,d2n,n2d   (optional: subtask filter)
        images/<key>.jpg

Positives of a query are the database images of its city within ``radius_m`` (25 m) in UTM;
panoramas are excluded from both sides. Validation cities: cph and sf.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from rrt_dist.schema import DatasetLayoutError

from .base import Benchmark, PlaceRecognitionProtocol, concat_manifests, make_manifest, read_csv, stable_id

VAL_CITIES = ("cph", "sf")
RAW_LAYOUT = "train_val/<city>/<query|database>/raw.csv with columns key,lon,lat,pano"
POST_LAYOUT = "train_val/<city>/<query|database>/postprocessed.csv with columns key,easting,northing"
SUBTASK_LAYOUT = "train_val/<city>/<query|database>/subtask_index.csv with columns key and one boolean per subtask"


def _read_side(root: Path, city: str, side: str, subtask: str):
    folder = root / "train_val" / city / side
    raw = read_csv(folder / "raw.csv", RAW_LAYOUT, ["key", "lon", "lat", "pano"], index_col=0)
    post = read_csv(folder / "postprocessed.csv", POST_LAYOUT, ["key", "easting", "northing"], index_col=0)
    frame = post.merge(raw[["key", "lon", "lat", "pano"]], on="key", how="left", validate="one_to_one")
    if frame["pano"].isna().any():
        missing = frame.loc[frame["pano"].isna(), "key"].tolist()[:3]
        raise DatasetLayoutError(folder / "raw.csv", f"keys {missing} of postprocessed.csv are missing", RAW_LAYOUT)
    keep = ~frame["pano"].astype(str).str.lower().isin(["true", "1"])
    if subtask != "all" or (folder / "subtask_index.csv").is_file():
        sub = read_csv(folder / "subtask_index.csv", SUBTASK_LAYOUT, ["key", subtask], index_col=0)
        chosen = set(sub.loc[sub[subtask].astype(str).str.lower().isin(["true", "1"]), "key"])
        keep &= frame["key"].isin(chosen)
    frame = frame[keep].reset_index(drop=True)
    rel = [f"train_val/{city}/{side}/images/{k}.jpg" for k in frame["key"]]
    manifest = make_manifest([stable_id(r) for r in rel], [str(root / r) for r in rel],
                             "query" if side == "query" else "gallery",
                             gps=frame[["lat", "lon"]].to_numpy(float).tolist(),
                             utm=frame[["easting", "northing"]].to_numpy(float).tolist())
    return manifest, frame[["easting", "northing"]].to_numpy(float)


def read_msls(root: str | Path, cities=VAL_CITIES, radius_m: float = 25.0, subtask: str = "all") -> Benchmark:
    root = Path(root)
    queries, gallery, positives = [], [], []
    offset = 0
    for city in cities:
        if not (root / "train_val" / city).is_dir():
            raise DatasetLayoutError(root / "train_val" / city, "city folder not found", RAW_LAYOUT)
        q_manifest, q_utm = _read_side(root, city, "query", subtask)
        db_manifest, db_utm = _read_side(root, city, "database", subtask)
        tree = cKDTree(db_utm)
        for near in tree.query_ball_point(q_utm, r=radius_m):
            positives.append(np.sort(np.asarray(near, dtype=np.int64)) + offset)
        offset += db_manifest.num_rows
        queries.append(q_manifest)
        gallery.append(db_manifest)
    return Benchmark(name="msls", queries=concat_manifests(queries), gallery=concat_manifests(gallery),
                     protocol=PlaceRecognitionProtocol(positives),
                     info={"root": str(root), "cities": list(cities), "radius_m": radius_m, "subtask": subtask})
