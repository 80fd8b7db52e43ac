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
    """``search.queries`` (a folder, CSV or Parquet of images) against gallery ``gallery.name``."""
    from omegaconf import OmegaConf

    from rrt_dist.datasets.image_list import images_at
    from rrt_dist.index.sharded import ShardedIndex
    from rrt_dist.runtime import init_ray

    from .extract import extract_to_lance
    from .ingest import image_paths
    from .rerank import open_pool

    record = gallery_record(cfg, cfg.gallery.name)
    directory, folder = record["directory"], record["fingerprint"]
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    settings = extract_settings(cfg.backbone)
    if cfg.search.rerank:
        check_reranker(cfg, cfg.search.rerank, "search.rerank")
    queries = images_at(cfg.search.queries)
    init_ray(cfg.ray)
    query_table = f"{directory}/queries/{source_key(cfg.search.queries)}/{folder}/query.lance"
    extract_to_lance(queries, query_table, cfg.backbone.name, options, replace(settings, local_storage="fp16"),
                     desc="extract queries", resources=OmegaConf.to_object(cfg.ray.extract))
    if not committed_ids(query_table).size:
        raise DatasetLayoutError(cfg.search.queries, f"no query image could be read (see "
                                 f"{query_table.removesuffix('.lance')}-errors.lance)", "readable images")
    query_store = FeatureStore(query_table, only=queries.column("id").to_numpy())
    query_ids, query_vectors = query_store.globals()
    index = ShardedIndex(record["index"], OmegaConf.to_object(cfg.ray.search))
    start = time.perf_counter()
    try:
        version, k = index.version, min(cfg.index.neighbours, index.manifest.ntotal)
        scores, ids = index.search(query_vectors, k)
    finally:
        index.close()
    timings = {"search_s": round(time.perf_counter() - start, 3)}
    reranked, rerank_scores, depth = None, None, min(cfg.reranker.depth, k)
    if cfg.search.rerank:
        start = time.perf_counter()
        tables = {"query": query_store, "gallery": FeatureStore(record["table"])}
        pool = open_pool(cfg.reranker, cfg.search.rerank, tables, resources=OmegaConf.to_object(cfg.ray.rerank))
        try:
            reranked, rerank_scores = pool.rerank_with_scores(query_ids, ids, scores, depth)
        finally:
            pool.close()
        timings["rerank_s"] = round(time.perf_counter() - start, 3)
    table = results_table(queries, query_ids, ids, scores, reranked, rerank_scores,
                          image_paths(directory, ids[ids != NO_ID]), version)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "results.parquet")
    pa.csv.write_csv(table, out / "results.csv")
    write_results_page(out / "results.html", table, cfg.search.rerank, version)
    missing = queries.num_rows - len(query_ids)
    print(f"gallery {cfg.gallery.name} (index version {version}): {len(query_ids)} queries, top-{k}"
          f"{f', reranked by {cfg.search.rerank} to depth {depth}' if reranked is not None else ''}"
          f"{f', {missing} unreadable' if missing else ''} -> {out / 'results.parquet'}")
    return {"results": str(out / "results.parquet"), "page": str(out / "results.html"),
            "queries": int(len(query_ids)), "unreadable": int(missing),
            "k": int(k), "index_version": int(version), **timings}


def image_url(location: str | None) -> str | None:
    """What a page's ``<img src>`` takes for an image: a local path as a ``file://`` URL, a URI as it is."""
    if location is None or "://" in location:
        return location
    return Path(location).resolve().as_uri()


def write_results_page(path: Path, table: pa.Table, rerank: str | None, version: int) -> None:
    """The search page (``search_page.html``, the service's) with ``table``'s results embedded: per query its
    image, the (reranked) top-k and, when reranked, the global order; images shown from their files."""
    import json

    queries: dict[int, dict] = {}
    for row in table.to_pylist():
        entry = {"path": row["gallery_path"], "image_url": image_url(row["gallery_path"]),
                 "global_score": row["global_score"], "global_rank": row["rank"], "rerank_score": row["rerank_score"]}
        query = queries.setdefault(row["query_id"], {"path": row["query_path"], "image_url": image_url(row["query_path"]),
                                                     "global": [], "results": []})
        query["global"].append({**entry, "rank": row["rank"]})
        query["results"].append({**entry, "rank": row["reranked_rank"] if rerank else row["rank"]})
    for query in queries.values():
        query["results"].sort(key=lambda r: r["rank"])
    data = json.dumps({"queries": list(queries.values()), "rerank": rerank, "index_version": version})
    safe = data.replace("</", "<\\/")                 # no "</script>" inside the JSON ends the block early
    embedded = f'<script id="results-data" type="application/json">{safe}</script>\n<script>'
    page = page_text("search_page.html").replace("<script>", embedded, 1)
    path.write_text(page)


def gallery_record(cfg, name: str) -> dict:
    """Gallery ``name``'s ingest record (with its ``directory``), refused by name when there is no such gallery or
    it holds another extractor's features than ``cfg.backbone``'s."""
    from .ingest import gallery_dir, read_record

    directory = gallery_dir(cfg.gallery.root, name)
    record = read_record(directory)
    if record is None or not record.get("index"):
        raise DatasetLayoutError(directory, f"no gallery {name!r} here (rrt-dist galleries lists them)",
                                 "a gallery made by rrt-dist ingest")
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    folder = table_folder(cfg.backbone.name, options, extract_settings(cfg.backbone))
    if folder != record["fingerprint"]:
        raise ConfigError(f"gallery {name!r} holds features of extractor {record['extractor']!r} "
                          f"({record['fingerprint']}), not of backbone {cfg.backbone.name!r} ({folder}): search it with "
                          f"the backbone and options it was ingested with")
    return {**record, "directory": directory}


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


def results_table(queries: pa.Table, query_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray,
                  reranked: np.ndarray | None, rerank_scores: np.ndarray | None, gallery_path: dict,
                  version: int) -> pa.Table:
    """One row per query and global rank: the query's path, the gallery image's id and path, the global score,
    its place in the reranked order (1-based; below the reranked depth the global order; null when not reranked),
    the reranker's score (null below the reranked depth or when not reranked), the index version that answered."""
    query_path = dict(zip(queries.column("id").to_pylist(), queries.column("uri").to_pylist()))
    rows = []
    for q, (qid, row_ids, row_scores) in enumerate(zip(query_ids, ids, scores)):
        place = {} if reranked is None else {int(g): r + 1 for r, g in enumerate(reranked[q]) if g != NO_ID}
        scored = {} if reranked is None else {int(g): float(s) for g, s in zip(reranked[q], rerank_scores[q])
                                              if g != NO_ID and not np.isnan(s)}
        for rank, (gid, score) in enumerate(zip(row_ids, row_scores), 1):
            if gid == NO_ID:                                 # past the index size
                continue
            rows.append({"query_path": query_path[int(qid)], "query_id": int(qid), "rank": rank,
                         "gallery_id": int(gid), "gallery_path": gallery_path.get(int(gid)),
                         "global_score": float(score), "reranked_rank": place.get(int(gid)),
                         "rerank_score": scored.get(int(gid)), "index_version": version})
    schema = pa.schema([("query_path", pa.string()), ("query_id", pa.int64()), ("rank", pa.int32()),
                        ("gallery_id", pa.int64()), ("gallery_path", pa.string()), ("global_score", pa.float32()),
                        ("reranked_rank", pa.int32()), ("rerank_score", pa.float64()), ("index_version", pa.int32())])
    return pa.Table.from_pylist(rows, schema=schema)
