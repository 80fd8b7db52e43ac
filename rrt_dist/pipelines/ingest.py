"""Galleries that grow: ingest new images into a named gallery's feature table and versioned sharded index.

A gallery lives under ``<gallery.root>/<name>/``::

    gallery.json                         name, extractor and fingerprint, table and index paths, ingest history
    images.lance                         each ingested image's id and path or URI (what a search answers with)
    features/<fingerprint>/gallery.lance the feature table (+ ``gallery-errors.lance``, the unreadable images)
    index/<fingerprint>/<factory>-<n>s/  the versioned sharded index (``rrt_dist.index.sharded``)

An ingest extracts only the images the table lacks (by stable id; an image whose file changed since is
extracted again), commits them in batches, then commits one new index version holding exactly the table's
rows. Killed at any point, rerunning the same command finishes the work: committed batches are skipped, an
index version is only ever committed whole, and files of a commit that never happened are collected.
"""
from __future__ import annotations

import json
import logging
import re
import time

import fsspec
import numpy as np
import pyarrow as pa

from rrt_dist.datasets.image_list import new_images
from rrt_dist.index.core import read_manifest
from rrt_dist.index.sharded import build_index, update_index
from rrt_dist.schema import DatasetLayoutError, ExtractSettings, PoolResources
from rrt_dist.store import FeatureStore, committed_sources, open_table
from rrt_dist.store.locks import writer_lock

from .extract import extract_to_lance
from .features import table_folder

log = logging.getLogger(__name__)

RECORD = "gallery.json"


def gallery_dir(root: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise DatasetLayoutError(name, "is not a gallery name (letters, digits, '_', '.', '-')", "gallery.name")
    return f"{root.rstrip('/')}/{name}"


def read_record(directory: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(directory)
    if not fs.exists(f"{path}/{RECORD}"):
        return None
    with fs.open(f"{path}/{RECORD}", "r") as f:
        return json.loads(f.read())


def write_record(directory: str, record: dict) -> None:
    fs, path = fsspec.core.url_to_fs(directory)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{RECORD}.tmp", "w") as f:
        f.write(json.dumps(record, indent=2))
    fs.mv(f"{path}/{RECORD}.tmp", f"{path}/{RECORD}")


def gallery_lock(directory: str, wait: bool = True):
    """Hold the gallery's ingest lock (``<gallery>/ingest.lock``, see :func:`rrt_dist.store.locks.writer_lock`), so
    two ingests into one gallery run one after the other (the second then skips what the first extracted) instead
    of appending the same ids twice and racing for the index version. ``wait=False`` raises :class:`Busy`."""
    return writer_lock(f"{directory.rstrip('/')}/ingest", f"gallery {directory}", wait)


def ingest(gallery_cfg, extractor: str, options: dict, settings: ExtractSettings, index_cfg,
           resources: PoolResources | None = None) -> dict:
    """Ingest a batch of new images into gallery ``gallery_cfg.name`` under its lock (:func:`gallery_lock`); see
    :func:`ingest_batch`."""
    if index_cfg.dba_n:
        from rrt_dist.schema import ConfigError

        raise ConfigError("index.dba_n: a gallery's index is updated in place batch by batch, and alpha-DBA vectors "
                          "depend on every neighbourhood; build a DBA index of the gallery's table with the index job")
    with gallery_lock(gallery_dir(gallery_cfg.root, gallery_cfg.name)):
        return ingest_batch(gallery_cfg, extractor, options, settings, index_cfg, resources)


def ingest_batch(gallery_cfg, extractor: str, options: dict, settings: ExtractSettings, index_cfg,
                 resources: PoolResources | None = None) -> dict:
    """Ingest a batch of new images (``gallery_cfg.images`` / ``.manifest``) into gallery ``gallery_cfg.name``:
    extract what the table lacks, then commit an index version with every row of the table. Returns the summary
    (new, skipped, changed, failed, errors table, index version and what the update did)."""
    batch = new_images(gallery_cfg.images, gallery_cfg.manifest)
    directory = gallery_dir(gallery_cfg.root, gallery_cfg.name)
    folder = table_folder(extractor, options, settings)
    record = read_record(directory) or {"name": gallery_cfg.name, "extractor": extractor, "history": []}
    if record.get("fingerprint", folder) != folder:
        raise DatasetLayoutError(directory, f"gallery {gallery_cfg.name!r} holds features of {record['fingerprint']}, "
                                 f"not of this backbone ({folder}): ingest with the backbone it was created with",
                                 "one extractor per gallery")
    table = f"{directory}/features/{folder}/gallery.lance"
    index_dir = f"{directory}/index/{folder}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', index_cfg.factory)}-{index_cfg.n_shards}s"
    record.update(fingerprint=folder, table=table, index=index_dir)
    write_record(directory, record)                      # the gallery exists (and is listed) from its first ingest

    start = time.perf_counter()
    before = committed_sources(table)[0]
    extracted = extract_to_lance(batch, table, extractor, options, settings, desc=f"ingest {gallery_cfg.name}",
                                 resources=resources)
    if not committed_sources(table)[0].size:
        raise DatasetLayoutError(batch.column("uri")[0].as_py(), f"no image of the batch could be read (see "
                                 f"{table.removesuffix('.lance')}-errors.lance, e.g. {extracted.error_samples})",
                                 "readable images")
    record_paths(directory, batch)
    store = FeatureStore(table)
    index_start = time.perf_counter()
    try:
        read_manifest(index_dir)
    except FileNotFoundError:
        manifest = build_index(store, index_dir, index_cfg.factory, index_cfg.n_shards, index_cfg.train_size,
                               index_cfg.memory_budget_gb * 2**30)
        update = {"action": "build", "added": manifest.ntotal, "removed": 0, "reason": manifest.history[-1]["reason"]}
    else:
        manifest, update = update_index(store, index_dir, index_cfg.rebuild_fraction)
    index_seconds = time.perf_counter() - index_start
    batch_ids = batch.column("id").to_numpy()
    new = int((np.isin(batch_ids, store.ids) & ~np.isin(batch_ids, before)).sum())
    summary = {"gallery": gallery_cfg.name, "batch": len(batch), "new": new,
               "changed": extracted.changed, "skipped": extracted.skipped, "failed": extracted.errors,
               "errors_table": table.removesuffix(".lance") + "-errors.lance", "error_samples": extracted.error_samples,
               "extract_images_per_s": round(extracted.images_per_second, 2), "rows": len(store),
               "index_version": manifest.version, "index_action": update["action"], "index_added": update["added"],
               "index_removed": update["removed"], "index_reason": update["reason"],
               "index_seconds": round(index_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
               "time": time.time()}
    record["history"].append({k: v for k, v in summary.items() if k != "error_samples"})
    write_record(directory, record)
    return summary


IMAGES = "images.lance"


def record_paths(directory: str, batch) -> None:
    """Append a batch's ids and paths to the gallery's image list (under the ingest lock: one writer)."""
    import lance

    uri = f"{directory}/{IMAGES}"
    lance.write_dataset(batch.select(["id", "uri"]), uri, mode="append" if open_table(uri) is not None else "create")


def image_paths(directory: str, ids) -> dict[int, str]:
    """The path or URI each of ``ids`` was ingested from (the latest ingest's), read for those ids only."""
    import pyarrow.compute as pc

    table = open_table(f"{directory}/{IMAGES}")
    if table is None:
        return {}
    wanted = pa.array(np.unique(np.asarray(ids, np.int64)))
    rows = table.to_table(columns=["id", "uri"], filter=pc.field("id").isin(wanted))
    return dict(zip(rows.column("id").to_pylist(), rows.column("uri").to_pylist()))     # later rows win


def list_galleries(root: str) -> list[dict]:
    """Every gallery under ``root``: name, rows, index version and size, extractor fingerprint, last ingest."""
    fs, path = fsspec.core.url_to_fs(root)
    out = []
    for entry in sorted(fs.ls(path, detail=False)) if fs.exists(path) else []:
        record = read_record(entry)
        if record is None:
            continue
        row = {"name": record["name"], "fingerprint": record.get("fingerprint", ""), "rows": 0, "index_version": None,
               "index_rows": 0, "ingests": len(record["history"]),
               "last_ingest": record["history"][-1]["time"] if record["history"] else None}
        if record.get("table") and fs.exists(record["table"]):
            row["rows"] = len(FeatureStore(record["table"]))
        try:
            manifest = read_manifest(record["index"])
            row.update(index_version=manifest.version, index_rows=manifest.ntotal, factory=manifest.factory,
                       shards=len(manifest.shards))
        except (FileNotFoundError, KeyError):
            pass
        out.append(row)
    return out
