"""The search job: a benchmark's queries against its sharded index, or query images against a gallery.

A gallery search (``search.queries`` set) extracts the queries with the gallery's own extractor (into a table
under ``<gallery>/queries/``, so a rerun extracts nothing again), searches the gallery's current index version,
optionally reranks the top ``reranker.depth`` with ``search.rerank`` (a registry reranker), and writes
``results.parquet`` and ``results.csv``: one row per query and rank with both paths, the ids, the global score,
the reranked order and the index version that answered.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
from tqdm import tqdm

from rrt_dist.schema import NO_ID, ConfigError, DatasetLayoutError
from rrt_dist.store import FeatureStore, committed_ids, take_globals_from

from .features import benchmark_features, extract_settings, global_matrix, source_key, table_folder
from .index import ensure_index, indexed_tables, search
from .pages import page_text

log = logging.getLogger(__name__)


def search_benchmark(cfg) -> dict:
    """A benchmark's queries against its index (built or updated first): ``neighbours.parquet``."""
    from omegaconf import OmegaConf

    from rrt_dist.index.sharded import write_neighbours

    bench, stores = benchmark_features(cfg)
    tables = [stores[n] for n in indexed_tables(cfg.index, stores)]
    index = ensure_index(cfg.index, bench.name, tables, OmegaConf.to_object(cfg.ray.search))
    query_ids, queries = global_matrix(stores, ["query"])
    k = cfg.index.neighbours
    start = time.perf_counter()
    try:
        scores, ids = search(index, queries, k, lambda ids: take_globals_from(tables, ids),
                             cfg.reranker.aqe if cfg.index.expand_queries else None)
    finally:
        index.close()
    seconds = time.perf_counter() - start
    path = Path(cfg.output_dir) / "neighbours.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_neighbours(str(path), query_ids, ids, scores)
    print(f"{len(query_ids)} queries, top-{k} in {seconds:.2f}s ({len(query_ids) / max(seconds, 1e-9):.0f} q/s) "
          f"-> {path}")
    return {"neighbours": str(path), "queries": int(len(query_ids)), "k": int(k),
            "mean_top1": float(np.mean(scores[:, 0])) if len(scores) else None}


def search_gallery(cfg) -> dict:
    """``search.queries`` (a folder, CSV or Parquet of images) against gallery ``gallery.name``'s snapshot,
    ``search.chunk`` queries at a time; each chunk's results are committed (a file under
    ``<gallery>/searches/<run digest>/``) as it ends, so a rerun of the same command redoes only what is missing."""
    from omegaconf import OmegaConf

    from rrt_dist.datasets.image_list import images_at
    from rrt_dist.index.sharded import ShardedIndex
    from rrt_dist.runtime import init_ray

    from .extract import extract_to_lance
    from .rerank import open_pool, scorer_options

    gallery, snapshot = gallery_snapshot(cfg, cfg.gallery.name)
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    settings = extract_settings(cfg.backbone)
    if cfg.search.rerank:
        check_reranker(cfg, cfg.search.rerank, "search.rerank")
    queries = images_at(cfg.search.queries)
    init_ray(cfg.ray)
    query_table = f"{gallery.directory}/queries/{source_key(cfg.search.queries)}/{snapshot.fingerprint}/query.lance"
    extract_to_lance(queries, query_table, cfg.backbone.name, options, replace(settings, local_storage="fp16"),
                     desc="extract queries", resources=OmegaConf.to_object(cfg.ray.extract))
    if not committed_ids(query_table).size:
        raise DatasetLayoutError(cfg.search.queries, f"no query image could be read (see "
                                 f"{query_table.removesuffix('.lance')}-errors.lance)", "readable images")
    query_store = FeatureStore(query_table, only=queries.column("id").to_numpy())
    in_order = queries.filter(pa.array(query_store.contains(queries.column("id").to_numpy())))
    query_ids = in_order.column("id").to_numpy()                  # the manifest's order
    index = ShardedIndex(snapshot.index, OmegaConf.to_object(cfg.ray.search), version=snapshot.index_version)
    k = min(cfg.index.neighbours, index.manifest.ntotal)
    depth = min(cfg.reranker.depth, k)
    work = ResultParts(f"{gallery.directory}/searches", {
        "queries": source_key(cfg.search.queries), "ids": digest_of(query_ids), **snapshot.versions, "k": k,
        "rerank": cfg.search.rerank, "depth": depth,
        "options": scorer_options(cfg.reranker, cfg.search.rerank) if cfg.search.rerank else None})
    pool = None
    if cfg.search.rerank:
        pool = open_pool(cfg.reranker, cfg.search.rerank, {"query": query_store, "gallery": snapshot.features()},
                         resources=OmegaConf.to_object(cfg.ray.rerank))
    catalog = snapshot.catalog_version_reader()
    query_path = dict(zip(in_order.column("id").to_pylist(), in_order.column("uri").to_pylist()))
    timings = {"search_s": 0.0, "rerank_s": 0.0}
    chunks = range(0, len(query_ids), cfg.search.chunk)
    done = work.done()
    if done:
        log.info("%d of %d query chunks were committed by an earlier run of this search: not searched again",
                 len(done), len(chunks))
    try:
        for part, first in tqdm(list(enumerate(chunks)), desc="search + rerank", unit="chunk", mininterval=2.0):
            if part in done:
                continue
            ids_c = query_ids[first:first + cfg.search.chunk]
            start = time.perf_counter()
            scores, ids = index.search(query_store.take_globals(ids_c), k)
            timings["search_s"] += time.perf_counter() - start
            reranked = rerank_scores = None
            if pool is not None:
                start = time.perf_counter()
                reranked, rerank_scores = pool.rerank_with_scores(ids_c, ids, scores, depth)
                timings["rerank_s"] += time.perf_counter() - start
            paths = catalog.uris(ids[ids != NO_ID])
            work.commit(part, results_table([query_path[int(q)] for q in ids_c], ids_c, ids, scores, reranked,
                                            rerank_scores, paths, snapshot.index_version))
    finally:
        index.close()
        if pool is not None:
            pool.close()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = work.assemble(out / "results.parquet", out / "results.csv", len(chunks))
    shown = write_results_page(out / "results.html", pq.read_table(out / "results.parquet"), cfg.search.rerank,
                               snapshot.index_version, cfg.search.page_queries, cfg.search.thumbnail_px)
    work.remove()
    missing = queries.num_rows - len(query_ids)
    print(f"gallery {cfg.gallery.name} (index version {snapshot.index_version}): {len(query_ids)} queries, top-{k}"
          f"{f', reranked by {cfg.search.rerank} to depth {depth}' if pool is not None else ''}"
          f"{f', {missing} unreadable' if missing else ''} -> {out / 'results.parquet'} ({rows} rows); "
          f"{out / 'results.html'} shows " + (f"the first {shown} of {len(query_ids)} queries (search.page_queries)"
                                             if shown < len(query_ids) else f"all {shown} queries"))
    return {"results": str(out / "results.parquet"), "page": str(out / "results.html"),
            "queries": int(len(query_ids)), "unreadable": int(missing), "page_queries": shown,
            "k": int(k), "index_version": int(snapshot.index_version), **{n: round(v, 3) for n, v in timings.items()}}


def digest_of(values) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest()[:16]


class ResultParts:
    """A gallery search's results, committed chunk by chunk under ``<folder>/<digest of what the search is>/``:
    a rerun of the same search (same queries, gallery snapshot, depths, reranker and options) finds the chunks
    an interrupted run committed; another search has another digest."""

    def __init__(self, folder: str, identity: dict):
        import hashlib
        import json

        import fsspec

        key = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.fs, self.path = fsspec.core.url_to_fs(f"{folder.rstrip('/')}/{key}")

    def _part(self, n: int) -> str:
        return f"{self.path}/part-{n:06d}.parquet"

    def done(self) -> set[int]:
        if not self.fs.isdir(self.path):
            return set()
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
        return {int(n[5:11]) for n in names if n.startswith("part-") and n.endswith(".parquet")}

    def commit(self, n: int, table: pa.Table) -> None:
        """Chunk ``n``'s results, written whole then renamed: a chunk is committed or absent, never partial."""
        self.fs.makedirs(self.path, exist_ok=True)
        with self.fs.open(f"{self._part(n)}.tmp", "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(f"{self._part(n)}.tmp", self._part(n))

    def assemble(self, parquet: Path, csv: Path, parts: int) -> int:
        """The chunks in order into one Parquet and one CSV file, streamed (a chunk in memory at a time)."""
        rows = 0
        with pq.ParquetWriter(parquet, RESULTS_SCHEMA) as pw, pa.csv.CSVWriter(csv, RESULTS_SCHEMA) as cw:
            for n in range(parts):
                with self.fs.open(self._part(n), "rb") as f:
                    table = pq.read_table(f).cast(RESULTS_SCHEMA)
                pw.write_table(table)
                cw.write_table(table)
                rows += table.num_rows
        return rows

    def remove(self) -> None:
        if self.fs.isdir(self.path):
            self.fs.rm(self.path, recursive=True)


def image_url(location: str | None) -> str | None:
    """What a page's ``<img src>`` takes for an image: a local path as a ``file://`` URL, a URI as it is."""
    if location is None or "://" in location:
        return location
    return Path(location).resolve().as_uri()


def embedded_json(data) -> str:
    """``data`` as JSON that an HTML ``<script>`` block holds as it is: no ``<`` (so no ``</script>`` or ``<!--``
    inside it ends or changes the block), ``>``, ``&`` or line separators, each written as its JSON escape."""
    import json

    text = json.dumps(data)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def write_results_page(path: Path, table: pa.Table, rerank: str | None, version: int, max_queries: int,
                       thumbnail_px: int) -> int:
    """The search page (``search_page.html``, the service's) with the results of the first ``max_queries`` queries
    of ``table`` embedded: per query its image, the (reranked) top-k and, when reranked, the global order, shown as
    thumbnails written beside the page (``<page>_files/``; a click opens the original file). Returns how many
    queries it shows."""
    import pyarrow.compute as pc

    from rrt_dist.eval.browse import write_thumbnails

    query_ids = pc.unique(table.column("query_id")).to_numpy()
    shown = query_ids[:max_queries]
    rows = table.filter(pc.is_in(table.column("query_id"), pa.array(shown))).to_pylist()
    folder = path.with_name(path.stem + "_files")
    names = {}                                            # image path -> thumbnail name
    for row in rows:
        for location in (row["query_path"], row["gallery_path"]):
            if location is not None and location not in names:
                names[location] = f"{len(names):06d}"
    write_thumbnails({name: (location, None) for location, name in names.items()}, folder, thumbnail_px)

    def image(location):
        return {"path": location, "image_url": f"{folder.name}/{names[location]}.jpg" if location else None,
                "full_url": image_url(location)}

    queries: dict[int, dict] = {}
    for row in rows:
        entry = {**image(row["gallery_path"]), "global_score": row["global_score"], "global_rank": row["rank"],
                 "rerank_score": row["rerank_score"]}
        query = queries.setdefault(row["query_id"], {**image(row["query_path"]), "global": [], "results": []})
        query["global"].append({**entry, "rank": row["rank"]})
        query["results"].append({**entry, "rank": row["reranked_rank"] if rerank else row["rank"]})
    for query in queries.values():
        query["results"].sort(key=lambda r: r["rank"])
    data = embedded_json({"queries": [queries[int(q)] for q in shown], "total_queries": len(query_ids),
                          "rerank": rerank, "index_version": version})
    embedded = f'<script id="results-data" type="application/json">{data}</script>\n<script>'
    path.write_text(page_text("search_page.html").replace("<script>", embedded, 1))
    return len(shown)


def gallery_snapshot(cfg, name: str):
    """Gallery ``name`` and the snapshot it answers from, refused by name when it is not ready (never ingested,
    an unfinished first ingest, an index version gone) or holds another extractor's features than
    ``cfg.backbone``'s."""
    from omegaconf import OmegaConf

    from rrt_dist.gallery import Gallery

    gallery = Gallery.open(cfg.gallery.root, name)
    snapshot = gallery.snapshot()
    snapshot.verify()                          # a damaged table is named, never searched as if whole
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    folder = table_folder(cfg.backbone.name, options, extract_settings(cfg.backbone))
    if folder != snapshot.fingerprint:
        raise ConfigError(f"gallery {name!r} holds features of extractor {gallery.record.get('extractor')!r} "
                          f"({snapshot.fingerprint}), not of backbone {cfg.backbone.name!r} ({folder}): search it with "
                          f"the backbone and options it was ingested with")
    return gallery, snapshot


def check_reranker(cfg, name: str, key: str) -> None:
    """Refuse, before any query is extracted, reranker ``name`` (set by ``key``) when the gallery's tables cannot
    feed it (GV without locals) or it is an RRT without loadable weights."""
    from rrt_dist.features import extractor_provides
    from rrt_dist.models.rrt import check_checkpoint
    from rrt_dist.rerank.methods import check_inputs, get_reranker

    check_inputs([name], {"backbone": extractor_provides(cfg.backbone.name)})
    if "checkpoint" in get_reranker(name).inputs:
        if cfg.reranker.checkpoint in (None, "train"):
            raise ConfigError(f"{key}={name} needs reranker.checkpoint=PATH (released or trained weights)")
        check_checkpoint(cfg.reranker.checkpoint)


RESULTS_SCHEMA = pa.schema([("query_path", pa.string()), ("query_id", pa.int64()), ("rank", pa.int32()),
                            ("gallery_id", pa.int64()), ("gallery_path", pa.string()), ("global_score", pa.float32()),
                            ("reranked_rank", pa.int32()), ("rerank_score", pa.float64()),
                            ("index_version", pa.int32())])


def results_table(query_paths: list, query_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray,
                  reranked: np.ndarray | None, rerank_scores: np.ndarray | None, gallery_path: dict,
                  version: int) -> pa.Table:
    """One row per query and global rank, as Arrow columns: the query's path, the gallery image's id and path, the
    global score, its place in the reranked order (1-based; below the reranked depth the global order; null when
    not reranked), the reranker's score (null below the reranked depth or when not reranked), the index version
    that answered. Padding past the index size (NO_ID) has no row."""
    n, k = ids.shape
    keep = ids != NO_ID
    place = np.zeros((n, k), np.int64)
    score = np.full((n, k), np.nan)
    if reranked is not None:
        # where each global entry went: reranked[q] is a permutation of ids[q] (padding stays at the end)
        order = np.argsort(ids, axis=1, kind="stable")
        sorted_ids = np.take_along_axis(ids, order, 1)
        at = np.take_along_axis(order, np.array([np.searchsorted(sorted_ids[q], reranked[q]) for q in range(n)]), 1)
        np.put_along_axis(place, at, np.arange(1, k + 1)[None, :].repeat(n, 0), 1)
        depth = rerank_scores.shape[1]
        np.put_along_axis(score, at[:, :depth], rerank_scores, 1)
    flat = keep.reshape(-1)
    gallery_ids = ids.reshape(-1)[flat]
    return pa.table({
        "query_path": pa.array(np.repeat(np.asarray(query_paths, dtype=object), k)[flat], pa.string()),
        "query_id": pa.array(np.repeat(np.asarray(query_ids, np.int64), k)[flat]),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)[flat]),
        "gallery_id": pa.array(gallery_ids),
        "gallery_path": pa.array([gallery_path.get(int(i)) for i in gallery_ids], pa.string()),
        "global_score": pa.array(scores.reshape(-1)[flat].astype(np.float32)),
        "reranked_rank": pa.array(place.reshape(-1)[flat], pa.int32(), mask=(place.reshape(-1)[flat] == 0)),
        "rerank_score": pa.array(score.reshape(-1)[flat], pa.float64(), mask=np.isnan(score.reshape(-1)[flat])),
        "index_version": pa.array(np.full(int(flat.sum()), version, np.int32)),
    }, schema=RESULTS_SCHEMA)
