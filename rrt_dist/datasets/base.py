"""The ``Benchmark`` abstraction: query + gallery manifests, ground truth and its protocol.

A manifest is an Arrow table keyed by a stable int64 ``id``; every later stage (features,
index, rerank) keys on these ids, never on row positions. Ids are derived from the image's
path relative to the dataset root (:func:`stable_id`), so they survive re-ordering, partial
runs (``distractors.limit``) and compaction. A ranking handed to :meth:`Benchmark.evaluate` is
a matrix of gallery ids, best first.
"""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from rrt_dist import metrics
from rrt_dist.schema import NO_ID, DatasetLayoutError

MANIFEST_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.int64()),                     # class / landmark id where the benchmark has one
    pa.field("bbox", pa.list_(pa.float32(), 4)),       # query crop x1, y1, x2, y2 in pixels
    pa.field("gps", pa.list_(pa.float64(), 2)),        # latitude, longitude
    pa.field("utm", pa.list_(pa.float64(), 2)),        # easting, northing (metres)
    pa.field("split", pa.string(), nullable=False),    # query | gallery | distractor | train | ...
])


def stable_id(key: str) -> int:
    """A stable signed int64 for an image key (its path relative to the dataset root)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def make_manifest(ids: Sequence[int], uris: Sequence[str], split: str | Sequence[str], *, labels=None,
                  bboxes=None, gps=None, utm=None) -> pa.Table:
    """Build a manifest; optional columns are null where not given (``None`` entries allowed)."""
    n = len(ids)
    if len(uris) != n:
        raise ValueError(f"{n} ids but {len(uris)} uris")
    ids = np.asarray(ids, dtype=np.int64)
    if (ids == NO_ID).any():
        bad = [uris[i] for i in np.flatnonzero(ids == NO_ID)[:3]]
        raise ValueError(f"image id -1 is reserved for 'no result' padding; images {bad} map to it")
    if len(np.unique(ids)) != n:
        dup = ids[np.flatnonzero(np.diff(np.sort(ids)) == 0)[:3]]
        raise ValueError(f"duplicate image ids in manifest, e.g. {dup.tolist()}")
    splits = [split] * n if isinstance(split, str) else list(split)

    def column(values, typ):
        return pa.nulls(n, typ) if values is None else pa.array(list(values), type=typ)

    return pa.Table.from_arrays([
        pa.array(ids, pa.int64()), pa.array(list(uris), pa.string()),
        column(labels, pa.int64()), column(bboxes, pa.list_(pa.float32(), 4)),
        column(gps, pa.list_(pa.float64(), 2)), column(utm, pa.list_(pa.float64(), 2)),
        pa.array(splits, pa.string()),
    ], schema=MANIFEST_SCHEMA)


def concat_manifests(tables: Iterable[pa.Table]) -> pa.Table:
    table = pa.concat_tables([t for t in tables if t is not None])
    ids = table.column("id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise ValueError("image ids collide across the concatenated manifests")
    return table


# --------------------------------------------------------------------------------------------
# Protocols: each evaluates a matrix of gallery *indices* (rows of the gallery manifest).
# --------------------------------------------------------------------------------------------

@dataclass
class RevisitopProtocol:
    """Revisited Oxford/Paris: easy / medium / hard mAP and mP@k; ``gnd`` indexes the gallery."""
    gnd: list[dict]
    kappas: tuple[int, ...] = (1, 5, 10)
    name: str = "revisitop"

    def evaluate(self, ranks: np.ndarray, positions: np.ndarray | None = None, per_query: dict | None = None) -> dict:
        return metrics.revisitop(ranks, self.gnd, self.kappas, positions, per_query)

    def relevant(self) -> list[np.ndarray]:
        """Per query, the gallery indices its metric looks for (easy, hard, junk): with their positions and the
        ranking's top, the whole ranking is not needed (``Benchmark.relevant_ids``)."""
        return [np.unique(np.concatenate([np.asarray(g.get(key, []), np.int64) for key in ("easy", "hard", "junk")]))
                for g in self.gnd]


@dataclass
class GLDv2Protocol:
    """GLDv2 retrieval: mAP@100 on the Public and Private query sets (Ignored ones dropped)."""
    relevant: list[set]           # per query: gallery indices
    usage: list[str]              # per query: "Public" | "Private"
    k: int = 100
    name: str = "gldv2"

    def evaluate(self, ranks: np.ndarray) -> dict:
        out = {}
        for usage in ("Public", "Private"):
            rows = [q for q, u in enumerate(self.usage) if u == usage]
            if rows:
                out[f"mAP@{self.k}/{usage.lower()}"] = metrics.gldv2_map_at_k(
                    {q: ranks[q].tolist() for q in rows}, {q: self.relevant[q] for q in rows}, self.k)
        return out

    def query_positives(self) -> list[np.ndarray]:
        return [np.fromiter(r, np.int64, len(r)) for r in self.relevant]


@dataclass
class PlaceRecognitionProtocol:
    """Recall@N for place recognition (positives = database images within a radius)."""
    positives: list[np.ndarray]
    ns: tuple[int, ...] = (1, 5, 10, 20)
    name: str = "recall@n"

    def evaluate(self, ranks: np.ndarray) -> dict:
        return {f"R@{n}": v for n, v in metrics.recall_at_n(ranks, self.positives, self.ns).items()}

    def query_positives(self) -> list[np.ndarray]:
        return self.positives


@dataclass
class MetricLearningProtocol:
    """SOP / CUB / Cars: queries are the gallery, self excluded (R@k, P@1, RP, MAP@R)."""
    labels: np.ndarray
    recall_ks: tuple[int, ...] = (1, 10, 100)
    r_includes_query: bool = False        # the ViT-reranking reference's R (see metric_learning_from_ranks)
    name: str = "metric_learning"

    def evaluate(self, ranks: np.ndarray) -> dict:
        _, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
        return metrics.metric_learning_from_ranks(ranks, self.labels, self.labels, counts[inverse] - 1,
                                                  self.recall_ks, self.r_includes_query)

    def query_positives(self) -> list[np.ndarray]:
        """Per query (= gallery image), the other images of its label."""
        order = np.argsort(self.labels, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(self.labels[order])) + 1)
        out: list = [None] * len(self.labels)
        for group in groups:
            for q in group:
                out[q] = group[group != q]
        return out


@dataclass
class PositivesProtocol:
    """Generic retrieval with explicit positives per query: mAP (trapezoidal) and recall@k; with ``labelled``
    (positives = the other images of the query's label) also P@1, R-Precision and MAP@R, with R the number
    of positives (Musgrave et al.'s definitions)."""
    positives: list[np.ndarray]
    ks: tuple[int, ...] = (1, 5, 10)
    labelled: bool = False
    name: str = "positives"

    def evaluate(self, ranks: np.ndarray) -> dict:
        aps = [metrics.average_precision(metrics.positive_positions(r, p), len(p))
               for r, p in zip(ranks, self.positives) if len(p)]
        out = {"mAP": float(np.mean(aps))}
        out.update({f"R@{n}": v for n, v in metrics.recall_at_n(ranks, self.positives, self.ks).items()})
        if self.labelled:
            out.update(metrics.precision_at_r(ranks, self.positives))
        return out

    def query_positives(self) -> list[np.ndarray]:
        return self.positives


@dataclass
class Benchmark:
    """Query and gallery manifests plus the protocol that scores a ranking.

    ``exclude_self``: the query set is the gallery (leave-one-out); each query's own id is removed
    from its ranking before scoring.
    """
    name: str
    queries: pa.Table
    gallery: pa.Table
    protocol: object
    exclude_self: bool = False
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        gallery_ids = self.gallery.column("id").to_numpy()
        self._order = np.argsort(gallery_ids, kind="stable")
        self._sorted_ids = gallery_ids[self._order]
        # ids that are the rows' positions plus a constant (revisitop: 0..N-1) map by subtraction
        consecutive = len(gallery_ids) and np.array_equal(np.diff(gallery_ids), np.ones(len(gallery_ids) - 1, np.int64))
        self._offset = int(gallery_ids[0]) if consecutive else None

    @property
    def n_distractors(self) -> int:
        return int(np.sum(np.asarray(self.gallery.column("split").to_pylist()) == "distractor"))

    def gallery_indices(self, ids: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        """Map gallery ids to gallery row indices; -1 (no result) stays -1, an unknown id is an error. Works
        through ``chunk`` ids at a time into int32 indices (a [70, 1M] ranking: 280 MB, not several int64
        copies of it); ids that are the rows' positions plus a constant (revisitop) are mapped by subtraction."""
        ids = np.asarray(ids)
        n = len(self._sorted_ids)
        out = np.empty(ids.shape, np.int32 if n < 2**31 else np.int64)
        flat, out_flat = ids.reshape(-1), out.reshape(-1)
        for s in range(0, len(flat), chunk):
            part = flat[s:s + chunk].astype(np.int64)
            if self._offset is not None:
                pos = part - self._offset
                found = (pos >= 0) & (pos < n)
                pos[~found] = 0
            else:
                pos = np.searchsorted(self._sorted_ids, part)
                np.clip(pos, 0, n - 1, out=pos)
                found = self._sorted_ids[pos] == part
            if not np.all(found | (part == NO_ID)):
                bad = part[~found & (part != NO_ID)][:3]
                raise KeyError(f"ids not in the {self.name} gallery, e.g. {bad.tolist()}")
            out_flat[s:s + chunk] = np.where(found, pos if self._offset is not None else self._order[pos], -1)
        return out

    @property
    def summarisable(self) -> bool:
        """Whether the protocol scores a ranking from its top and its relevant ids' places (see ``relevant_ids``)."""
        return not self.exclude_self and hasattr(self.protocol, "relevant")

    def relevant_ids(self) -> list[np.ndarray] | None:
        """Per query, the gallery ids its protocol's metric depends on beyond the ranking's top (revisitop: positives
        and junk), or None when the protocol needs the whole ranking (or leaves each query out of its own)."""
        if not self.summarisable:
            return None
        gallery_ids = self.gallery.column("id").to_numpy()
        return [gallery_ids[indices] for indices in self.protocol.relevant()]

    def evaluate(self, ranked_ids: np.ndarray, positions: np.ndarray | None = None,
                 per_query: dict | None = None) -> dict:
        """Score ``ranked_ids`` (``[n_queries, n_ranked]`` gallery ids, best first; -1 pads short rows). With
        ``positions`` (each entry's place in the whole ranking), ``ranked_ids`` summarises the ranking: its top and
        every id of :meth:`relevant_ids`. ``per_query`` receives each query's AP (NaN without positives) under
        each of the protocol's names (revisitop: easy / medium / hard; others: "AP"), for results browsers."""
        ranked_ids = np.asarray(ranked_ids)
        if ranked_ids.ndim != 2 or ranked_ids.shape[0] != self.queries.num_rows:
            raise ValueError(f"expected rankings for {self.queries.num_rows} queries, got shape {ranked_ids.shape}")
        if positions is not None:
            if not self.summarisable:
                raise ValueError(f"the {self.protocol.name} protocol scores whole rankings, not summaries")
            return checked_fractions(self.protocol.evaluate(self.gallery_indices(ranked_ids), positions, per_query),
                                     self.name)
        if self.exclude_self:
            query_ids = self.queries.column("id").to_numpy()
            keep = ranked_ids != query_ids[:, None]
            width = int(keep.sum(axis=1).min())
            ranked_ids = np.stack([row[k][:width] for row, k in zip(ranked_ids, keep)])
        indices = self.gallery_indices(ranked_ids)
        if self.protocol.name == "revisitop":
            return checked_fractions(self.protocol.evaluate(indices, per_query=per_query), self.name)
        if per_query is not None:
            per_query["AP"] = np.asarray([metrics.average_precision(metrics.positive_positions(row, p), len(p))
                                          if len(p) else np.nan
                                          for row, p in zip(indices, self.protocol.query_positives())])
        return checked_fractions(self.protocol.evaluate(indices), self.name)


def checked_fractions(metrics: dict, benchmark: str, path: str = "") -> dict:
    """``metrics`` (nested dicts of fractions) if every value lies in [0, 1] (NaN: no query to score); otherwise a
    loud error: a mAP of 200 % means the ranking or the tables are broken (ids twice), and is never reported."""
    for key, value in metrics.items():
        where = f"{path}{key}"
        if isinstance(value, dict):
            checked_fractions(value, benchmark, f"{where}/")
        elif not (value != value or 0.0 <= float(value) <= 1.0):
            raise RuntimeError(f"{benchmark}: metric {where} = {value!r} is outside [0, 1]; the ranking holds an image "
                               f"twice or the feature tables are corrupt: nothing is reported")
    return metrics


class _GroundTruthUnpickler(pickle.Unpickler):
    """Ground-truth pickles hold lists, dicts and numpy arrays only; refuse anything else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("copyreg", "_reconstructor"), ("builtins", "object")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a ground-truth file")
        return super().find_class(module, name)


def load_ground_truth_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        return _GroundTruthUnpickler(f, encoding="latin1").load()


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(path, "file not found", expected)
    return path


def read_csv(path: Path, expected: str, columns: Sequence[str], **kwargs):
    """Read a CSV with pandas, naming the file and the expected layout when it doesn't fit."""
    import pandas as pd

    require_file(path, expected)
    try:
        frame = pd.read_csv(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - any parser failure is a layout problem of this file
        raise DatasetLayoutError(path, f"cannot parse ({err})", expected) from err
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetLayoutError(path, f"missing column(s) {missing}, found {list(frame.columns)}", expected)
    return frame


def int_column(frame, column: str, path: Path | str, expected: str) -> np.ndarray:
    """``frame[column]`` as int64; a cell that is not an integer is a layout error naming the file, its line
    (the header is line 1) and the column."""
    values = frame[column].astype(str).str.strip()
    bad = ~values.str.fullmatch(r"[+-]?\d+")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetLayoutError(path, f"line {row + 2}, column {column}: {values.iloc[row]!r} is not an integer"
                                 f"{' (empty)' if not values.iloc[row] else ''}", expected)
    low, high = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    outside = [i for i, v in enumerate(values.tolist()) if not low <= int(v) <= high]
    if outside:
        raise DatasetLayoutError(path, f"line {outside[0] + 2}, column {column}: {values.iloc[outside[0]]} is outside "
                                 f"the 64-bit signed integers ({low} to {high})", expected)
    return values.astype(np.int64).to_numpy()


def unique_entries(entries: Sequence[str], path: Path | str, column: str, expected: str) -> None:
    """A layout error naming the first entry listed twice and its lines (the header is line 1)."""
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry in seen:
            raise DatasetLayoutError(path, f"{column} {entry!r} is listed twice (lines {seen[entry] + 2} and {i + 2})",
                                     expected)
        seen[entry] = i
