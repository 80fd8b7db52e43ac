"""Manifest -> Lance feature table with Ray Data.

    read rows (id, uri, bbox) -> decode, crop, resize   (CPU tasks, map_batches)
                              -> extract + write fragment (actor pool of extractors, map_batches)
                              -> commit fragments        (this process, every ``commit_every`` images)

Resumable and idempotent: ids already committed (or recorded as unreadable) are not extracted
again, only the driver commits, each commit is one atomic Lance version, and a commit that would
add an id twice is refused. Unreadable images go to the errors table with their reason.
"""
from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from rrt_dist.features import create_extractor, create_preparer, fingerprint
from rrt_dist.features.base import Prepared, to_original
from rrt_dist.features.core import decode_and_prepare, features_table, schema_for
from rrt_dist.features.images import ImageError
from rrt_dist.store import check_schema, commit_fragments, committed_ids, write_fragment

log = logging.getLogger(__name__)

ERRORS_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("reason", pa.string())])


@dataclass
class ExtractSettings:
    batch_size: int = 16              # images per actor call (and per written fragment)
    num_actors: int | None = None     # default: one per GPU, else 1
    actor_cpus: float = 1.0           # logical CPUs reserved per actor (decode tasks use the rest)
    torch_threads: int | None = None  # intra-op threads per actor (default: the node's CPUs / actors)
    commit_every: int = 256           # images per Lance commit
    retry_errors: bool = False        # re-try ids recorded as unreadable
    stop_after_commits: int | None = None  # fault injection for tests: raise after N commits


@dataclass
class ExtractSummary:
    uri: str
    extracted: int = 0
    skipped: int = 0                  # already committed or recorded before this run
    errors: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0      # until the first batch came back (workers, actors, model load)
    startup_images: int = 0
    version: int | None = None
    error_samples: dict = field(default_factory=dict)

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


def decode_batch(batch: dict, extractor_name: str, extractor_cfg: dict) -> dict:
    """map_batches task: decode, crop and resize a batch of manifest rows (CPU)."""
    preparer = create_preparer(extractor_name, **extractor_cfg)
    images, geometry, errors = [], [], []
    for uri, bbox in zip(batch["uri"], batch["bbox"]):
        bbox = None if bbox is None else list(bbox)
        try:
            prepared, offset = decode_and_prepare(uri, bbox, preparer)
            images.append(prepared.image)
            geometry.append([*prepared.factor, *offset])
            errors.append("")
        except ImageError as err:
            images.append(np.zeros((1, 1, 3), np.uint8))
            geometry.append([1.0, 1.0, 0.0, 0.0])
            errors.append(str(err))
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return {"id": np.asarray(batch["id"], np.int64), "uri": np.asarray(batch["uri"], dtype=object), "image": column,
            "geometry": np.asarray(geometry, np.float64), "error": np.asarray(errors, dtype=object)}


class ExtractAndWrite:
    """Actor: runs the extractor on a batch and writes it as an uncommitted Lance fragment."""

    def __init__(self, extractor_name: str, extractor_cfg: dict, uri: str, torch_threads: int | None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.extractor = create_extractor(extractor_name, **extractor_cfg)
        self.schema = schema_for(self.extractor, fingerprint(self.extractor))
        self.uri = uri

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        fragments = b""
        if ok:
            prepared = [Prepared(batch["image"][i], tuple(batch["geometry"][i][:2]), (0.0, 0.0)) for i in ok]
            feats = [to_original(f, p, tuple(batch["geometry"][i][2:]))
                     for i, p, f in zip(ok, prepared, self.extractor.extract(prepared))]
            table = features_table(self.schema, [int(batch["id"][i]) for i in ok], feats)
            fragments = pickle.dumps(write_fragment(self.uri, table))
        bad = [(int(batch["id"][i]), str(batch["uri"][i]), str(e)) for i, e in enumerate(batch["error"]) if e]
        return {"fragments": np.asarray([fragments], dtype=object),
                "ids": np.asarray([json.dumps([int(batch["id"][i]) for i in ok])]),
                "errors": np.asarray([json.dumps(bad)])}


def _append_errors(uri: str, errors: list[tuple]) -> None:
    ids, uris, reasons = zip(*errors)
    table = pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string()),
                      "reason": pa.array(reasons, pa.string())}, schema=ERRORS_SCHEMA)
    lance.write_dataset(table, uri, mode="append" if Path(uri).exists() else "create")


def extract_to_lance(manifest: pa.Table, uri: str | Path, extractor_name: str, extractor_cfg: dict | None = None,
                     settings: ExtractSettings | None = None, errors_uri: str | Path | None = None,
                     desc: str = "extract") -> ExtractSummary:
    """Extract every manifest row not yet in the table at ``uri``; returns a summary."""
    extractor_cfg = dict(extractor_cfg or {})
    settings = settings or ExtractSettings()
    uri = str(uri)
    errors_uri = str(errors_uri or f"{uri.removesuffix('.lance')}-errors.lance")
    probe = create_extractor(extractor_name, **extractor_cfg)  # fails fast on bad config or missing weights
    schema = schema_for(probe, fingerprint(probe))
    del probe

    if Path(uri).exists():  # refuse before any work: the table must be this extractor's
        check_schema(lance.dataset(uri).schema, schema, uri)
    done = set(committed_ids(uri).tolist())
    recorded = set() if settings.retry_errors else set(committed_ids(errors_uri).tolist())
    all_ids = manifest.column("id").to_numpy()
    todo_mask = ~np.isin(all_ids, np.fromiter(done | recorded, np.int64, len(done | recorded)))
    todo = manifest.filter(pa.array(todo_mask)).select(["id", "uri", "bbox"])
    summary = ExtractSummary(uri=uri, skipped=int((~todo_mask).sum()))
    if todo.num_rows == 0:
        summary.version = lance.dataset(uri).version if done else None
        log.info("%s: nothing to extract (%d already done)", uri, summary.skipped)
        return summary

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    num_actors = settings.num_actors or max(1, gpus)
    threads = settings.torch_threads or max(1, int(resources.get("CPU", 1)) // num_actors)
    pool = ray.data.ActorPoolStrategy(size=num_actors)
    # Small input blocks so results stream back (and get committed) while the run goes on.
    rows_per_block = settings.batch_size
    blocks = [todo.slice(i, rows_per_block) for i in range(0, todo.num_rows, rows_per_block)]
    ds = (ray.data.from_arrow(blocks)
          .map_batches(decode_batch, fn_kwargs={"extractor_name": extractor_name, "extractor_cfg": extractor_cfg},
                       batch_size=settings.batch_size, batch_format="numpy", num_cpus=1)
          .map_batches(ExtractAndWrite, fn_constructor_args=(extractor_name, extractor_cfg, uri, threads),
                       batch_size=settings.batch_size, batch_format="numpy", compute=pool,
                       num_gpus=1 if gpus else 0, num_cpus=settings.actor_cpus))

    start = time.perf_counter()
    pending_fragments, pending_ids, commits = [], [], 0
    errors: list[tuple] = []

    def commit():
        nonlocal pending_fragments, pending_ids, commits
        if pending_fragments:
            ids = np.concatenate(pending_ids)
            clash = done.intersection(ids.tolist())
            if clash or len(np.unique(ids)) != len(ids):
                raise RuntimeError(f"refusing to commit duplicate ids to {uri}: {sorted(clash)[:5]}")
            summary.version = commit_fragments(uri, schema, pending_fragments).version
            done.update(ids.tolist())
            commits += 1
        if errors:
            _append_errors(errors_uri, errors)
            summary.error_samples.update({i: reason for i, _, reason in errors[:5]})
            errors.clear()
        pending_fragments, pending_ids = [], []
        if settings.stop_after_commits is not None and commits >= settings.stop_after_commits:
            raise InjectedFailure(f"stopping after {commits} commit(s) (fault injection)")

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
    _compact(uri)
    log.info("%s: %d images in %.1fs (%.1f img/s), %d errors, %d skipped, version %s", uri, summary.extracted,
             summary.seconds, summary.images_per_second, summary.errors, summary.skipped, summary.version)
    return summary


def _compact(uri: str, max_fragments: int = 64) -> None:
    """Merge small fragments once there are many (ids are the keys, so moving rows is harmless)."""
    try:
        ds = lance.dataset(uri)
    except (ValueError, FileNotFoundError, OSError):
        return
    if len(ds.get_fragments()) > max_fragments:
        ds.optimize.compact_files()
