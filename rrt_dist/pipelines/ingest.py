"""Galleries that grow: ingest new images into a named gallery (:class:`rrt_dist.gallery.Gallery`).

An ingest, under the gallery's lock:

1. reads the batch (a folder or a manifest; none: only bring the gallery to a consistent state), and refuses by
   row an id the gallery lists with another path (``gallery.replace=true`` replaces it);
2. reconciles the gallery with its catalog: rows the catalog lists but the table lacks (lost with a damaged data
   file, then restored) are extracted again from their listed path; table rows no catalog lists (a run killed
   between a feature commit and its catalog rows) are removed and extracted again if the batch has them;
3. extracts what the table lacks (by stable id; an image whose file changed since is extracted again), each
   feature commit followed by its ids' catalog rows;
4. commits one index version holding exactly the table's rows;
5. commits the gallery's snapshot (index, table and catalog versions): readers move to it in one step.

Killed at any point, rerunning the same command finishes the work: committed batches are skipped, catalog rows are
merged on id (never listed twice), an index version is only ever committed whole, and readers keep answering from
the last committed snapshot until the next one.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from rrt_dist.datasets.image_list import new_images
from rrt_dist.gallery import Gallery, Snapshot
from rrt_dist.index.core import current_manifest
from rrt_dist.index.sharded import build_index, update_index
from rrt_dist.schema import ConfigError, DatasetLayoutError, ExtractSettings, PoolResources
from rrt_dist.store import FeatureStore, committed_ids, delete_ids, open_table

from .extract import extract_to_lance
from .features import table_folder

log = logging.getLogger(__name__)


def ingest(gallery_cfg, extractor: str, options: dict, settings: ExtractSettings, index_cfg,
           resources: PoolResources | None = None) -> dict:
    """Ingest a batch of new images into gallery ``gallery_cfg.name`` under its lock (two ingests into one gallery
    run one after the other); see :func:`ingest_batch`."""
    if index_cfg.dba_n:
        raise ConfigError("index.dba_n: a gallery's index is updated in place batch by batch, and alpha-DBA vectors "
                          "depend on every neighbourhood; build a DBA index of the gallery's table with the index job")
    with Gallery.open(gallery_cfg.root, gallery_cfg.name).lock():
        gallery = Gallery.open(gallery_cfg.root, gallery_cfg.name)      # as the previous holder left it
        return ingest_batch(gallery, gallery_cfg, extractor, options, settings, index_cfg, resources)


def batch_of(gallery_cfg, gallery: Gallery) -> pa.Table:
    """The images to ingest: ``gallery.images`` or ``gallery.manifest``; neither, for a gallery that exists, is an
    empty batch (the ingest then only reconciles and commits)."""
    if gallery_cfg.images is None and gallery_cfg.manifest is None and gallery.record is not None:
        return pa.table({"id": pa.array([], pa.int64()), "uri": pa.array([], pa.string())})
    return new_images(gallery_cfg.images, gallery_cfg.manifest)


def listed(gallery: Gallery, table_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, uris)`` the gallery's catalog lists, sorted by id. An earlier release's append-only list (a row per
    ingest of an image, unreadable ones included) is rewritten once: one row per id, the latest, for the ids the
    table holds."""
    catalog = gallery.catalog
    if open_table(catalog.uri) is not None and not catalog.is_merged():
        old = catalog.latest().all()
        last = {int(i): u for i, u in zip(*old)}                              # later rows win
        keep = np.asarray(sorted(set(last) & set(table_ids.tolist())), np.int64)
        catalog.rewrite(pa.table({"id": keep, "uri": [last[int(i)] for i in keep]}))
        log.info("gallery %s: catalog rewritten as one row per image (%d rows, from %d)", gallery.name, len(keep),
                 len(old[0]))
    current = catalog.latest()
    if current is None:
        return np.zeros(0, np.int64), np.zeros(0, object)
    ids, uris = current.all()
    order = np.argsort(ids, kind="stable")
    return ids[order], uris[order]


def refused_rows(batch: pa.Table, ids: np.ndarray, uris: np.ndarray, replace: bool) -> tuple[np.ndarray, dict]:
    """Rows of ``batch`` whose id the catalog (``ids`` sorted, ``uris``) lists with another path: a mask, and
    ``{id: reason}`` of a few. ``replace``: none is refused (the new path replaces the listed one)."""
    batch_ids = batch.column("id").to_numpy()
    batch_uris = np.asarray(batch.column("uri").to_pylist(), dtype=object)
    if replace or not len(ids) or not len(batch_ids):
        return np.zeros(len(batch_ids), bool), {}
    pos = np.clip(np.searchsorted(ids, batch_ids), 0, len(ids) - 1)
    clash = (ids[pos] == batch_ids) & (uris[pos] != batch_uris)
    samples = {int(i): f"id {int(i)} is already the gallery's image {uris[p]}, not {u} (gallery.replace=true "
                       f"replaces it)" for i, p, u in zip(batch_ids[clash][:5], pos[clash][:5], batch_uris[clash][:5])}
    return clash, samples


def ingest_batch(gallery: Gallery, gallery_cfg, extractor: str, options: dict, settings: ExtractSettings, index_cfg,
                 resources: PoolResources | None = None) -> dict:
    """Ingest a batch into ``gallery`` (held locked), in the order of this module's docstring. Returns the summary
    (new, skipped, changed, failed, refused, lost rows extracted again, errors table, index version and what the
    update did)."""
    batch = batch_of(gallery_cfg, gallery)
    folder = table_folder(extractor, options, settings)
    if gallery.fingerprint not in (None, folder):
        raise DatasetLayoutError(gallery.directory, f"gallery {gallery.name!r} holds features of {gallery.fingerprint}, "
                                 f"not of this backbone ({folder}): ingest with the backbone it was created with",
                                 "one extractor per gallery")
    table = gallery.table_uri(folder)
    index_dir = gallery.index_dir(folder, index_cfg.factory, index_cfg.n_shards)
    start = time.perf_counter()
    before = committed_ids(table)
    ids, uris = listed(gallery, before)
    refused, refused_samples = refused_rows(batch, ids, uris, gallery_cfg.replace)
    batch = batch.filter(pa.array(~refused)).select(["id", "uri"])
    orphans = before[~np.isin(before, ids)]
    if len(orphans):              # committed, never listed: not part of the gallery; extracted again if in the batch
        log.warning("gallery %s: %d table row(s) no catalog row lists (a run stopped between the two); removing them",
                    gallery.name, len(orphans))
        delete_ids(table, orphans)
        before = before[~np.isin(before, orphans)]
    lost = ~np.isin(ids, before) & ~np.isin(ids, batch.column("id").to_numpy())
    if lost.any():
        log.warning("gallery %s: %d listed image(s) have no features (a restored table): extracting them again",
                    gallery.name, int(lost.sum()))
        batch = pa.concat_tables([batch, pa.table({"id": ids[lost], "uri": pa.array(uris[lost].tolist(), pa.string())})])
    if not batch.num_rows and not len(before):
        raise DatasetLayoutError(gallery.directory, "nothing to ingest: the gallery holds no image and the batch "
                                 "lists none", "gallery.images or gallery.manifest")
    uri_of = dict(zip(batch.column("id").to_pylist(), batch.column("uri").to_pylist()))
    batch = batch.append_column("bbox", pa.nulls(batch.num_rows, pa.list_(pa.float32(), 4)))
    extracted = extract_to_lance(batch, table, extractor, options, settings, desc=f"ingest {gallery.name}",
                                 resources=resources,
                                 on_commit=lambda new: gallery.catalog.upsert(new, [uri_of[int(i)] for i in new]))
    store = FeatureStore(table) if open_table(table) is not None else None
    if store is None or not len(store):
        raise DatasetLayoutError(batch.column("uri")[0].as_py(), f"no image of the batch could be read (see "
                                 f"{table.removesuffix('.lance')}-errors.lance, e.g. {extracted.error_samples})",
                                 "readable images")
    catalog_version = list_the_table(gallery, store, uri_of)
    index_start = time.perf_counter()
    if current_manifest(index_dir) is None:
        manifest = build_index(store, index_dir, index_cfg.factory, index_cfg.n_shards, index_cfg.train_size,
                               index_cfg.memory_budget_gb * 2**30)
        update = {"action": "build", "added": manifest.ntotal, "removed": 0, "reason": manifest.history[-1]["reason"]}
    else:
        manifest, update = update_index(store, index_dir, index_cfg.rebuild_fraction)
    index_seconds = time.perf_counter() - index_start
    batch_ids = batch.column("id").to_numpy()
    summary = {"gallery": gallery.name, "batch": int(len(refused)), "new": int((np.isin(batch_ids, store.ids)
                                                                               & ~np.isin(batch_ids, before)).sum()),
               "changed": extracted.changed, "skipped": extracted.skipped, "failed": extracted.errors,
               "refused": int(refused.sum()), "refused_samples": refused_samples, "restored": int(lost.sum()),
               "errors_table": table.removesuffix(".lance") + "-errors.lance", "error_samples": extracted.error_samples,
               "extract_images_per_s": round(extracted.images_per_second, 2), "rows": len(store),
               "index_version": manifest.version, "index_action": update["action"], "index_added": update["added"],
               "index_removed": update["removed"], "index_reason": update["reason"],
               "index_seconds": round(index_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
               "time": time.time()}
    snapshot = Snapshot(gallery=gallery.name, fingerprint=folder, index=index_dir, index_version=manifest.version,
                        table=table, table_version=store.version, catalog=gallery.catalog.uri,
                        catalog_version=catalog_version)
    gallery.commit(snapshot, {k: v for k, v in summary.items() if not k.endswith("_samples")}, extractor=extractor)
    return summary


def list_the_table(gallery: Gallery, store: FeatureStore, uri_of: dict) -> int:
    """Make the catalog list exactly the table's rows: rows the batch brought that are not listed yet (committed by
    a run stopped before listing them, or a replaced path) are listed; listed ids the table no longer holds (an
    image that became unreadable) are unlisted. Returns the catalog version a snapshot pins."""
    ids, uris = listed(gallery, store.ids)
    in_table = np.isin(ids, store.ids)
    batch_ids = np.asarray(sorted(uri_of), np.int64)
    mine = batch_ids[np.isin(batch_ids, store.ids)]
    pos = np.clip(np.searchsorted(ids, mine), 0, max(len(ids) - 1, 0))
    stale = mine[(ids[pos] != mine) | (uris[pos] != np.asarray([uri_of[int(i)] for i in mine], dtype=object))] \
        if len(ids) else mine
    if len(stale):
        gallery.catalog.upsert(stale, [uri_of[int(i)] for i in stale])
    if (~in_table).any():
        gallery.catalog.unlist(ids[~in_table])
    return gallery.catalog.tidy()


def list_galleries(root: str) -> list[dict]:
    """Every gallery under ``root``: name, state (ready, or why not), rows, index version and size, extractor
    fingerprint, last ingest. A damaged gallery is listed as such; the others are listed all the same."""
    return [Gallery.open(root, name).describe() for name in Gallery.names(root)]
