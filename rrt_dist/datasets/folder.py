"""A user's own images.

Layout (``root``)::

    gallery.csv   path,label        path relative to root (or absolute); label optional
    queries.csv   path,label        optional; instead of label, positives = ';'-separated gallery paths
                                    (``dataset.queries`` names another file of root: another query set)

Without ``queries.csv`` every gallery image is a query against the others (leave-one-out, its
positives are the other images of its label). Scores: mAP and recall@k, and with labels P@1, RP and
MAP@R.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rrt_dist.schema import DatasetLayoutError

from .base import Benchmark, PositivesProtocol, int_column, make_manifest, read_csv, stable_id, unique_entries

GALLERY_LAYOUT = "gallery.csv with columns path[,label]"
QUERIES_LAYOUT = "queries.csv with columns path and either label or positives (';'-separated gallery paths)"


def read_folder(root: str | Path, queries: str = "queries.csv") -> Benchmark:
    root = Path(root)
    gallery_csv = root / "gallery.csv"
    frame = read_csv(gallery_csv, GALLERY_LAYOUT, ["path"], dtype={"path": str}, keep_default_na=False)
    paths = frame["path"].str.strip().tolist()
    unique_entries(paths, gallery_csv, "path", GALLERY_LAYOUT)
    labels = int_column(frame, "label", gallery_csv, GALLERY_LAYOUT) if "label" in frame else None
    gallery = make_manifest([stable_id(p) for p in paths], [str(root / p) for p in paths], "gallery",
                            labels=None if labels is None else labels.tolist())
    position = {p: i for i, p in enumerate(paths)}

    queries_csv = root / queries
    if queries != "queries.csv" and not queries_csv.is_file():
        raise DatasetLayoutError(queries_csv, "the queries file dataset.queries names is not there", QUERIES_LAYOUT)
    if not queries_csv.is_file():
        if labels is None:
            raise DatasetLayoutError(gallery_csv, "leave-one-out evaluation (no queries.csv) needs a label column",
                                     GALLERY_LAYOUT)
        positives = [np.flatnonzero((labels == labels[i]) & (np.arange(len(labels)) != i)) for i in range(len(labels))]
        return Benchmark(name="folder", queries=gallery, gallery=gallery,
                         protocol=PositivesProtocol(positives, labelled=True),
                         exclude_self=True, info={"root": str(root)})

    qframe = read_csv(queries_csv, QUERIES_LAYOUT, ["path"], dtype=str, keep_default_na=False)
    qpaths = qframe["path"].str.strip().tolist()
    unique_entries(qpaths, queries_csv, "path", QUERIES_LAYOUT)
    if "positives" in qframe:
        positives = []
        for qp, cell in zip(qpaths, qframe["positives"]):
            names = [p.strip() for p in cell.split(";") if p.strip()]
            unknown = [p for p in names if p not in position]
            if unknown:
                raise DatasetLayoutError(queries_csv, f"query {qp}: positives {unknown[:3]} are not in gallery.csv",
                                         QUERIES_LAYOUT)
            positives.append(np.asarray(sorted(position[p] for p in names), dtype=np.int64))
        qlabels = None
    elif "label" in qframe:
        if labels is None:
            raise DatasetLayoutError(gallery_csv, "queries.csv has labels but gallery.csv has none", GALLERY_LAYOUT)
        qlabels = int_column(qframe, "label", queries_csv, QUERIES_LAYOUT)
        positives = [np.flatnonzero(labels == lab) for lab in qlabels]
    else:
        raise DatasetLayoutError(queries_csv, "needs a label or a positives column", QUERIES_LAYOUT)
    queries = make_manifest([stable_id(p) for p in qpaths], [str(root / p) for p in qpaths], "query",
                            labels=None if qlabels is None else qlabels.tolist())
    return Benchmark(name="folder", queries=queries, gallery=gallery,
                     protocol=PositivesProtocol(positives, labelled=qlabels is not None),
                     info={"root": str(root)})
