"""Manifest -> Lance feature table with Ray Data.

    read rows (id, uri, bbox) -> decode, crop, resize   (CPU tasks, map_batches)
                              -> extract + write fragment (actor pool of extractors, map_batches)
                              -> commit fragments        (this process, every ``commit_every`` images)

An extractor that reads descriptor files (``reads="files"``: released DELG) takes one step instead: each row's
``uri`` is its descriptor file, read and written as a fragment by CPU tasks (no image, no model, no actor pool).

Resumable and idempotent: ids already committed (or recorded as unreadable) are not extracted
again, only the driver commits, each commit is one atomic Lance version, and a commit that would
add an id twice is refused. Unreadable images go to the errors table with their reason.

Tied to the images: every row records its file's identity (size and modification time). A rerun
re-extracts the rows (and retries the recorded errors) whose file changed since, and a table
folder left by a run killed before its first commit, or fragments it wrote but never committed,
are cleaned up before the run starts.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from rrt_dist.devices import require_gpu
from rrt_dist.features import (config_fingerprint, create_extractor, create_preparer, extractor_reads_files,
                               fingerprint)
from rrt_dist.features.base import Prepared
from rrt_dist.features.core import decode_and_prepare, extract_batch, features_table, schema_for
from rrt_dist.features.images import ImageError, file_identity
from rrt_dist.schema import (DEFAULT_MAX_PIXELS, ExtractSettings, FeatureTableMismatch, PoolResources, StorageFull,
                             is_disk_full)
from rrt_dist.store import (FeatureStore, check_schema, commit_fragments, committed_sources, delete_ids, open_table,
                            remove_uncommitted, write_fragment)
from rrt_dist.store.features import (META_FINGERPRINT, local_encoding, local_shape, read_codebook, train_pq,
                                     write_codebook)
from rrt_dist.store.cleanup import remove_old_versions
from rrt_dist.store.versions import TableCreatedMeanwhile, compact
from rrt_dist.store.locks import writer_lock

log = logging.getLogger(__name__)

ERRORS_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("reason", pa.string()), ("source", pa.string())])


@dataclass
class ExtractSummary:
    uri: str
    extracted: int = 0
    already: int = 0                  # committed before this run (and unchanged)
    recorded_errors: int = 0          # recorded as unreadable before this run (and unchanged), not retried
    changed: int = 0                  # rows / recorded errors whose file changed since: extracted again
    errors: int = 0                   # unreadable in this run
    seconds: float = 0.0
    startup_seconds: float = 0.0      # until the first batch came back (workers, actors, model load)
    startup_images: int = 0
    version: int | None = None
    error_samples: dict = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return self.already + self.recorded_errors

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """Throughput after start-up, what a long run converges to."""
        busy = self.seconds - self.startup_seconds
        return (self.extracted - self.startup_images) / busy if busy > 0 else 0.0


class InjectedFailure(RuntimeError):
    pass


def decode_batch(batch: dict, extractor_name: str, extractor_cfg: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """map_batches task: decode, crop and resize a batch of manifest rows (CPU); records each file's identity."""
    preparer = create_preparer(extractor_name, **extractor_cfg)
    images, geometry, errors, sources = [], [], [], []
    for uri, bbox in zip(batch["uri"], batch["bbox"]):
        bbox = None if bbox is None else list(bbox)
        sources.append(file_identity(uri))       # before decoding: a file changed meanwhile is redone next run
        try:
            prepared, offset = decode_and_prepare(uri, bbox, preparer, max_pixels)
            images.append(prepared.image)
            geometry.append([*prepared.factor, *(np.add(offset, prepared.offset))])   # query crop + preparer's crop
            errors.append("")
        except ImageError as err:
            images.append(np.zeros((1, 1, 3), np.uint8))
            geometry.append([1.0, 1.0, 0.0, 0.0])
            errors.append(str(err))
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return {"id": np.asarray(batch["id"], np.int64), "uri": np.asarray(batch["uri"], dtype=object), "image": column,
            "geometry": np.asarray(geometry, np.float64), "error": np.asarray(errors, dtype=object),
            "source": np.asarray(sources, dtype=object)}


class ExtractAndWrite:
    """Actor: runs the extractor on a batch and writes it as an uncommitted Lance fragment."""

    def __init__(self, extractor_name: str, extractor_cfg: dict, uri: str, torch_threads: int, local_storage: str,
                 codebook: np.ndarray | None):
        import torch

        torch.set_num_threads(torch_threads)    # the actor's own CPUs (Ray sets 1 thread per reserved CPU otherwise)
        require_gpu("extract")                  # a GPU Ray gave it is used (device "auto" picks it) or refused
        self.extractor = create_extractor(extractor_name, **extractor_cfg)
        self.schema = schema_for(self.extractor, fingerprint(self.extractor), local_storage, codebook)
        self.uri, self.codebook = uri, codebook

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        feats = []
        if ok:
            prepared = [Prepared(batch["image"][i], tuple(batch["geometry"][i][:2]), (0.0, 0.0)) for i in ok]
            feats = extract_batch(self.extractor, prepared, [tuple(batch["geometry"][i][2:]) for i in ok])
        bad = [(int(batch["id"][i]), str(batch["uri"][i]), str(e), str(batch["source"][i]))
               for i, e in enumerate(batch["error"]) if e]
        return written_batch(self.uri, self.schema, [int(batch["id"][i]) for i in ok], feats,
                             [str(batch["source"][i]) for i in ok], self.codebook, bad)


def read_and_write(batch: dict, extractor_name: str, extractor_cfg: dict, uri: str, local_storage: str,
                   codebook: np.ndarray | None) -> dict:
    """map_batches task for an extractor that reads descriptor files (released DELG): each row's ``uri`` is its
    file; a file that is missing or not such a file is recorded as the row's error."""
    reader = create_extractor(extractor_name, **extractor_cfg)
    schema = schema_for(reader, fingerprint(reader), local_storage, codebook)
    ids, feats, sources, bad = [], [], [], []
    for image_id, path in zip(batch["id"], batch["uri"]):
        source = file_identity(path)        # before reading: a file changed meanwhile is read again next run
        try:
            feats.append(reader.read(str(path)))
        except (OSError, ValueError) as err:
            bad.append((int(image_id), str(path), f"{path}: {type(err).__name__}: {err}", source))
            continue
        ids.append(int(image_id))
        sources.append(source)
    return written_batch(uri, schema, ids, feats, sources, codebook, bad)


def written_batch(uri: str, schema: pa.Schema, ids: list[int], feats: list, sources: list[str],
                  codebook: np.ndarray | None, bad: list[tuple]) -> dict:
    """A batch's features written as one uncommitted Lance fragment, in the rows the driver commits from."""
    fragments = pickle.dumps(write_fragment(uri, features_table(schema, ids, feats, sources, codebook))) if ids else b""
    return {"fragments": np.asarray([fragments], dtype=object), "ids": np.asarray([json.dumps(ids)]),
            "errors": np.asarray([json.dumps(bad)])}


def _append_errors(uri: str, errors: list[tuple]) -> None:
    ids, uris, reasons, sources = zip(*errors)
    table = pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string()),
                      "reason": pa.array(reasons, pa.string()), "source": pa.array(sources, pa.string())},
                     schema=ERRORS_SCHEMA)
    lance.write_dataset(table, uri, mode="append" if open_table(uri) is not None else "create")


def file_identities(uris: list[str], chunk: int = 4096, threads: int = 16) -> np.ndarray:
    """:func:`file_identity` of every uri (stat calls in threads: I/O bound on network filesystems)."""
    parts = [uris[s:s + chunk] for s in range(0, len(uris), chunk)]
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(uris), desc="check image files", unit="img",
                                                   disable=len(uris) < 100_000, mininterval=2.0) as bar:
        out = []
        for part in pool.map(lambda p: [file_identity(u) for u in p], parts):
            out.extend(part)
            bar.update(len(part))
    return np.asarray(out, dtype=object)


def changed_since(ids: np.ndarray, sources: np.ndarray, manifest_ids: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Ids of rows recorded with another file identity than the manifest's file has now (rows of unknown
    identity, e.g. imported descriptors, and ids the manifest does not list are left alone)."""
    order = np.argsort(manifest_ids)
    pos = np.clip(np.searchsorted(manifest_ids[order], ids), 0, max(len(manifest_ids) - 1, 0))
    listed = (manifest_ids[order][pos] == ids) if len(manifest_ids) else np.zeros(len(ids), bool)
    known = np.asarray([s is not None for s in sources], bool)
    differs = np.zeros(len(ids), bool)
    check = listed & known
    differs[check] = current[order[pos[check]]] != sources[check]
    return ids[differs]


def _prepare_table(uri: str, what: str, grace_s: float) -> None:
    note = remove_uncommitted(uri, grace_s)
    if note:
        log.warning("%s: %s", what, note)


def pq_codebook(manifest: pa.Table, uri: str, extractor_name: str, extractor_cfg: dict, settings: ExtractSettings,
                resources: PoolResources | None) -> np.ndarray:
    """Train the PQ codebook of a new table on the locals of ``settings.local_pq_sample`` of its images (a seeded
    sample), extracted in fp16 to ``<table>-pq-sample.lance`` beside it (kept: a rerun reuses it)."""
    rows = np.sort(np.random.default_rng(0).choice(manifest.num_rows, min(manifest.num_rows, settings.local_pq_sample),
                                                   replace=False))
    sample_uri = f"{uri.removesuffix('.lance')}-pq-sample.lance"
    extract_to_lance(manifest.take(rows), sample_uri, extractor_name, extractor_cfg,
                     replace(settings, local_storage="fp16"), desc="extract pq sample", resources=resources)
    sample = FeatureStore(sample_uri)
    locals_ = sample.take_locals(sample.ids)
    log.info("%s: training a %d-byte PQ codebook on %d local descriptors of %d images", uri, settings.local_pq_m,
             int((~locals_["mask"]).sum()), len(sample))
    return train_pq(locals_["local"][~locals_["mask"]], settings.local_pq_m)


def extract_to_lance(manifest: pa.Table, uri: str | Path, extractor_name: str, extractor_cfg: dict | None = None,
                     settings: ExtractSettings | None = None, errors_uri: str | Path | None = None,
                     desc: str = "extract", resources: PoolResources | None = None,
                     on_commit=None) -> ExtractSummary:
    """Extract every manifest row not yet in the table at ``uri`` (or whose file changed since) on an actor pool
    of ``resources`` (``ray.extract``); returns a summary. One writer at a time per table (``<uri>.lock``): a second
    run on the same table waits, then finds the rows the first committed and extracts none of them again.
    ``on_commit(ids)`` runs after each commit with the ids it added (a gallery lists them in its catalog)."""
    with writer_lock(str(uri), f"table {uri}"):
        try:
            return _extract_to_lance(manifest, str(uri), extractor_name, extractor_cfg, settings, errors_uri, desc,
                                     resources, on_commit)
        except Exception as err:
            if is_disk_full(err):    # raised in a Ray task or a commit, buried under Ray's retry advice otherwise
                raise StorageFull(f"no space left on the device of {uri} while extracting: free space and rerun the "
                                  f"same command (the rows committed so far are kept)") from None
            raise


def _extract_to_lance(manifest, uri, extractor_name, extractor_cfg, settings, errors_uri, desc,
                      resources, on_commit=None) -> ExtractSummary:
    extractor_cfg = dict(extractor_cfg or {})
    settings = settings or ExtractSettings()
    resources = resources or PoolResources()
    uri = str(uri)
    errors_uri = str(errors_uri or f"{uri.removesuffix('.lance')}-errors.lance")
    expected_fp = config_fingerprint(extractor_name, **extractor_cfg)
    for path in (uri, errors_uri):
        _prepare_table(path, desc, settings.uncommitted_grace_s)
    table = open_table(uri)
    if table is not None:  # refuse before any work: the table must be this extractor's
        found = (table.schema.metadata or {}).get(META_FINGERPRINT, b"?").decode()
        if found != expected_fp:
            raise FeatureTableMismatch(f"{uri} holds features of fingerprint {found}, not of the requested extractor "
                                       f"{extractor_name!r} ({expected_fp}); use another output path or the extractor "
                                       f"that wrote it")
        if local_encoding(table.schema) != settings.local_storage and local_shape(table.schema)[0]:
            raise FeatureTableMismatch(f"{uri} stores local descriptors as {local_encoding(table.schema)}, not "
                                       f"{settings.local_storage}: use another output path or its encoding")

    all_ids = manifest.column("id").to_numpy()
    current = file_identities(manifest.column("uri").to_pylist())
    done, done_sources = committed_sources(uri)
    recorded, recorded_sources = committed_sources(errors_uri)
    changed = changed_since(done, done_sources, all_ids, current)
    changed_errors = changed_since(recorded, recorded_sources, all_ids, current)
    if len(changed):
        log.warning("%s: %d image(s) changed since they were extracted (e.g. %s): extracting them again", uri,
                    len(changed), changed[:3].tolist())
        delete_ids(uri, changed)
    retried = recorded[np.isin(recorded, all_ids)] if settings.retry_errors else changed_errors
    if len(retried):
        delete_ids(errors_uri, retried)
    done = done[~np.isin(done, changed)]
    recorded = recorded[~np.isin(recorded, retried)]
    todo_mask = ~np.isin(all_ids, np.concatenate([done, recorded]))
    todo = manifest.filter(pa.array(todo_mask)).select(["id", "uri", "bbox"])
    summary = ExtractSummary(uri=uri, already=int(np.isin(all_ids, done).sum()),
                             recorded_errors=int(np.isin(all_ids, recorded).sum()),
                             changed=int(len(changed) + len(changed_errors)))
    if todo.num_rows == 0:
        summary.version = table.version if done.size else None
        log.info("%s: nothing to extract (%d already extracted, %d recorded as unreadable in %s)", uri,
                 summary.already, summary.recorded_errors, errors_uri)
        return summary
    probe = create_extractor(extractor_name, **extractor_cfg)  # fails fast on missing weights, before the pool starts
    codebook = None
    if settings.local_storage == "pq" and probe.max_local:
        if table is not None:                         # a table keeps the codebook it began with
            codebook = read_codebook(uri, table.schema)
        else:
            codebook = pq_codebook(todo, uri, extractor_name, extractor_cfg, settings, resources)
            write_codebook(uri, codebook)
    schema = schema_for(probe, fingerprint(probe), settings.local_storage if probe.max_local else "fp16", codebook)
    del probe
    if table is not None:
        check_schema(table.schema, schema, uri)
    done = set(done.tolist())

    # Small input blocks so results stream back (and get committed) while the run goes on.
    rows_per_block = settings.batch_size
    blocks = [todo.slice(i, rows_per_block) for i in range(0, todo.num_rows, rows_per_block)]
    if extractor_reads_files(extractor_name):
        ds = ray.data.from_arrow(blocks).map_batches(
            read_and_write, fn_kwargs={"extractor_name": extractor_name, "extractor_cfg": extractor_cfg, "uri": uri,
                                       "local_storage": local_encoding(schema), "codebook": codebook},
            batch_size=settings.batch_size, batch_format="numpy", num_cpus=1)
    else:
        ds = (ray.data.from_arrow(blocks)
              .map_batches(decode_batch, fn_kwargs={"extractor_name": extractor_name, "extractor_cfg": extractor_cfg,
                                                    "max_pixels": settings.max_image_pixels},
                           batch_size=settings.batch_size, batch_format="numpy", num_cpus=1)
              .map_batches(ExtractAndWrite, fn_constructor_args=(extractor_name, extractor_cfg, uri, resources.threads,
                                                                 local_encoding(schema), codebook),
                           batch_size=settings.batch_size, batch_format="numpy", compute=resources.strategy(),
                           **resources.actor_options()))

    start = time.perf_counter()
    pending_fragments, pending_ids, commits = [], [], 0
    errors: list[tuple] = []
    seen_version = None if table is None else table.version      # the table as this writer last saw it

    def commit():
        nonlocal pending_fragments, pending_ids, commits, seen_version
        if settings.stop_after_commits is not None and commits >= settings.stop_after_commits and pending_fragments:
            if settings.stop_by_kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFailure(f"stopping after {commits} commit(s) (fault injection)")
        if pending_fragments:
            ids = np.concatenate(pending_ids)
            while True:
                latest = open_table(uri, verify=False)      # the job checked it whole when it began
                if latest is not None and latest.version != seen_version:
                    # another writer committed since (a store with no lock): what it added counts as done too
                    done.update(committed_sources(uri)[0].tolist())
                clash = done.intersection(ids.tolist())
                if clash or len(np.unique(ids)) != len(ids):
                    raise RuntimeError(f"refusing to commit image ids {uri} already holds, e.g. {sorted(clash)[:5]} "
                                       f"(another writer extracted them meanwhile); rerun to extract only what is "
                                       f"missing")
                try:
                    summary.version = seen_version = commit_fragments(uri, schema, pending_fragments).version
                    break
                except TableCreatedMeanwhile:       # another writer's first commit came first: check against it
                    continue
            done.update(ids.tolist())
            commits += 1
            if on_commit is not None:
                on_commit(ids)
        if errors:
            _append_errors(errors_uri, errors)
            summary.error_samples.update({i: reason for i, _, reason, _ in errors[:5]})
            errors.clear()
        pending_fragments, pending_ids = [], []

    with tqdm(total=todo.num_rows, desc=desc, unit="img", mininterval=2.0) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for frag, ids_json, errors_json in zip(batch["fragments"], batch["ids"], batch["errors"]):
                ids, bad = json.loads(ids_json), json.loads(errors_json)
                if frag:
                    pending_fragments.extend(pickle.loads(frag))
                    pending_ids.append(np.asarray(ids, np.int64))
                errors.extend(tuple(e) for e in bad)
                summary.extracted += len(ids)
                summary.errors += len(bad)
                if not summary.startup_seconds:
                    summary.startup_seconds, summary.startup_images = time.perf_counter() - start, len(ids)
                bar.update(len(ids) + len(bad))
                if sum(len(i) for i in pending_ids) + len(errors) >= settings.commit_every:
                    commit()
        commit()
    summary.seconds = time.perf_counter() - start
    compact(uri)
    note = remove_old_versions(uri, settings.keep_versions)
    if note:
        log.info("%s", note)
    log.info("%s: extracted %d images in %.1fs (%.1f img/s), %d unreadable; before this run %d were extracted and %d "
             "recorded as unreadable; version %s", uri, summary.extracted, summary.seconds, summary.images_per_second,
             summary.errors, summary.already, summary.recorded_errors, summary.version)
    return summary
