"""The results browser's data: per query, each row's top-K with each image's standing under the protocol, where a
reranked row found it in the ranking it reranked, the query's AP per protocol in every row, and thumbnails of the
images shown (only those). Written as JavaScript files (``rrtBrowse.load(...)``) beside a static page, so the page
opens from a file URL with no server; a run of 70 queries over R1M needs only these, never the gallery."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rrt_dist.datasets import Benchmark
from rrt_dist.features.images import ImageError, load_image
from rrt_dist.schema import NO_ID

QUERIES_PER_FILE = 50     # a query page loads one file of this many queries


def _drop_self(row: np.ndarray, own: int | None) -> np.ndarray:
    row = row[row != NO_ID]
    return row if own is None else row[row != own]


def statuses(bench: Benchmark, q: int) -> dict[int, str]:
    """Gallery index -> what it is to query ``q``: revisitop ``easy`` / ``hard`` / ``junk`` (each protocol decides
    what counts), other protocols ``positive``; absent: a negative."""
    if bench.protocol.name == "revisitop":
        g = bench.protocol.gnd[q]
        out = {int(i): "junk" for i in g.get("junk", [])}
        out.update({int(i): key for key in ("easy", "hard") for i in g.get(key, [])})
        return out
    return {int(i): "positive" for i in bench.protocol.query_positives()[q]}


def moved_by(per_query: dict, bases: dict) -> np.ndarray:
    """``[n_queries]``: each query's largest AP change by any reranked row against the row it reranked (first
    setting, every protocol; NaN-free), by which the browser keeps the most-moved queries of a large run."""
    first = per_query[next(iter(per_query))]
    changes = [np.nan_to_num(np.abs(first[row][p] - first[base][p]))
               for row, base in bases.items() for p in first[row]]
    n = len(next(iter(next(iter(first.values())).values())))
    return np.max(changes, axis=0) if changes else np.zeros(n)


def chosen_queries(per_query: dict, bases: dict, max_queries: int) -> list[int]:
    """All queries, or the ``max_queries`` that reranking moved most (in their benchmark order)."""
    moved = moved_by(per_query, bases)
    if len(moved) <= max_queries:
        return list(range(len(moved)))
    return sorted(np.argsort(-moved, kind="stable")[:max_queries].tolist())


def query_record(bench: Benchmark, q: int, examples: dict, bases: dict, top: int) -> dict:
    """Query ``q``'s rows: per setting and row label its first ``top`` gallery ids (as strings: 64-bit ids do not
    survive JavaScript's numbers; its own id left out in
    leave-one-out benchmarks) as ``[id, status]``, reranked rows' as ``[id, status, was]`` (``was``: 1-based place
    in the row it reranked, None if not there), and up to ``top`` positives that no shown row holds."""
    own = int(bench.queries.column("id")[q].as_py()) if bench.exclude_self else None
    status = statuses(bench, q)
    rows: dict = {}
    shown: set = set()
    for setting, by_row in examples.items():
        rows[setting] = {}
        for label, ranked in by_row.items():
            ids = _drop_self(ranked[q], own)
            head = ids[:top]
            base = _drop_self(examples[setting][bases[label]][q], own) if label in bases else None
            place = {int(g): i + 1 for i, g in enumerate(base.tolist())} if base is not None else {}
            indices = bench.gallery_indices(head)
            rows[setting][label] = [[str(g), status.get(int(i), "")] + ([place.get(int(g))] if base is not None else [])
                                    for g, i in zip(head.tolist(), indices.tolist())]
            shown.update(int(i) for i in indices.tolist())
    gallery_ids = bench.gallery.column("id").to_numpy()
    missed = [i for i, s in sorted(status.items()) if s != "junk" and i not in shown][:top]
    return {"rows": rows, "missed": [[str(gallery_ids[i]), status[i]] for i in missed]}


def _finite(value: float):
    return None if value is None or math.isnan(value) else round(float(value), 5)


def query_summary(bench: Benchmark, q: int, per_query: dict) -> dict:
    """What the query list shows of query ``q``: its id, file name and AP per setting, row and protocol."""
    uri = bench.queries.column("uri")[q].as_py()
    return {"q": q, "id": str(bench.queries.column("id")[q].as_py()), "name": Path(uri).name,
            "ap": {setting: {row: {p: _finite(v[q]) for p, v in by_p.items()} for row, by_p in by_row.items()}
                   for setting, by_row in per_query.items()}}


def crop_origin(bbox) -> np.ndarray:
    """Pixel of the full image at a crop's (0, 0), as :func:`rrt_dist.features.images.load_image` crops."""
    return np.zeros(2) if bbox is None else np.floor(np.maximum(np.asarray(bbox[:2], float), 0))


def write_thumbnail(uri: str, bbox, path: Path, max_side: int) -> list[int] | None:
    """A JPEG of at most ``max_side`` pixels a side; returns the (cropped) image's size ``[w, h]``, or None if the
    image cannot be read (the page shows a placeholder)."""
    import cv2

    try:
        rgb = load_image(uri, bbox)
    except ImageError:
        return None
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return [w, h]


def write_thumbnails(images: dict[str, tuple[str, object]], folder: Path, max_side: int,
                     threads: int = 4) -> dict[str, list[int] | None]:
    """``images``: thumbnail name -> (uri, bbox); each written once into ``folder``; returns name -> size."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(images)
    with ThreadPoolExecutor(threads) as pool:          # decoding and resizing release the GIL
        sizes = pool.map(lambda n: write_thumbnail(images[n][0], images[n][1], folder / f"{n}.jpg", max_side), names)
        return dict(zip(names, sizes))


def normalised(points, origin_q: np.ndarray, size_q, size_c) -> list:
    """Evidence points ``[qx, qy, cx, cy, *rest]`` in pixels -> fractions of each image's width / height (the query's
    measured from its crop), so the page draws them over thumbnails of any size."""
    out = []
    for qx, qy, cx, cy, *rest in points:
        out.append([round((qx - origin_q[0]) / size_q[0], 4), round((qy - origin_q[1]) / size_q[1], 4),
                    round(cx / size_c[0], 4), round(cy / size_c[1], 4), *(round(float(r), 6) for r in rest)])
    return out


def normalised_weights(points, origin: np.ndarray, size) -> list:
    return [[round((x - origin[0]) / size[0], 4), round((y - origin[1]) / size[1], 4), round(float(w), 6)]
            for x, y, w in points]


def write_data(folder: Path, summary: dict, records: dict[int, dict]) -> None:
    """``data/run.js`` (the summary: table, rows, per-query APs) and ``data/queries-<n>.js`` (query pages' rows,
    ``QUERIES_PER_FILE`` queries each), as calls the page's script answers."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "run.js").write_text(f"rrtBrowse.load(document.currentScript, {json.dumps(summary, allow_nan=False)});\n")
    chunks: dict[int, dict] = {}
    for q, record in records.items():
        chunks.setdefault(q // QUERIES_PER_FILE, {})[str(q)] = record
    for n, chunk in chunks.items():
        (data / f"queries-{n}.js").write_text(
            f"rrtBrowse.load(document.currentScript, {json.dumps(chunk, allow_nan=False)});\n")
