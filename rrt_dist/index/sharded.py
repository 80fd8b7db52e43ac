"""Sharded FAISS index served by Ray actors (one per shard), with build, versioned updates and persistence.

Layout of an index directory (local path or fsspec URI)::

    manifest.json                   the committed version: dimension, metric, factory, shards (file, rows
                                    file, id range or delta, count), source tables + Lance versions,
                                    extractor fingerprint, why ``auto`` chose the factory, history
    versions/manifest-000003.json   every committed version
    shard-00000-v000001.faiss       one FAISS index per contiguous id range (the build) or per delta
    shard-00000-v000001.rows.parquet  its rows: id and image-file identity
    trained-v000001.faiss           the trained empty index the delta shards start from

Files are written once and never changed: an update writes new files for the shards it changes (rows
removed because their image changed or left the tables) and for the delta shards receiving new rows, then
commits a new manifest in one rename. New rows go to delta shards, keeping the trained quantizer, until they
pass ``rebuild_fraction`` of the index, which then is retrained and rebuilt (faiss#2109, faiss#2876); each
version's history entry says which and why. A shard actor serves one file and reloads it after a restart;
:meth:`ShardedIndex.refresh` moves a searcher to the newest version without stopping it. Queries from another
extractor than the one indexed are refused.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from functools import partial

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from rrt_dist.devices import require_faiss_gpu
from rrt_dist.schema import NO_ID, IndexMismatch, SearchResources
from rrt_dist.store import FeatureStore, take_globals_from

from .core import (IndexManifest, ShardInfo, choose_factory, collect_garbage, commits_index, gpu_index, merge_results,
                   new_index, read_index, read_manifest, rows_digest, shard_bounds, train, write_index, write_manifest)
from .qe import alpha_qe_search, database_augmentation

log = logging.getLogger(__name__)


def _shard_file(i: int, version: int) -> str:
    return f"shard-{i:05d}-v{version:06d}.faiss"


def _rows_file(shard_file: str) -> str:
    return shard_file.removesuffix(".faiss") + ".rows.parquet"


def _sources(stores) -> list[FeatureStore]:
    stores = [stores] if isinstance(stores, FeatureStore) else list(stores)
    prints = {s.fingerprint for s in stores}
    if len(prints) != 1:
        raise IndexMismatch(f"feature tables of different extractors cannot share an index: "
                            f"{[(s.uri, s.fingerprint) for s in stores]}")
    return stores


def table_identities(stores) -> tuple[np.ndarray, np.ndarray]:
    """Ids and image-file identities of every row of ``stores``."""
    parts = [s.sources() for s in stores]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _open_tables(tables: list[tuple]) -> list[FeatureStore]:
    return [FeatureStore(u, v, only=only) for u, v, only in tables]


def table_refs(stores) -> list[tuple]:
    """``(uri, version, ids in view or None)`` of each table: what tasks and actors open them by."""
    return [(s.uri, s.version, s.ids if s.restricted else None) for s in stores]


def _read_globals(tables: list[tuple], ids: np.ndarray, transform=None) -> np.ndarray:
    vectors = take_globals_from(_open_tables(tables), ids)
    return vectors if transform is None else transform(ids, vectors)


def write_rows(uri: str, ids: np.ndarray, sources: np.ndarray) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.table({"id": pa.array(np.asarray(ids, np.int64)),
                                 "source": pa.array([None if x is None else str(x) for x in sources], pa.string())}), f)


def _read_rows_file(directory: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    fs, path = fsspec.core.url_to_fs(directory)
    with fs.open(f"{path}/{name}", "rb") as f:
        table = pq.read_table(f)
    return table.column("id").to_numpy(), np.asarray(table.column("source").to_pylist(), dtype=object)


def read_rows(directory: str, manifest: IndexManifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, sources, shard)`` of every indexed row of ``manifest``."""
    ids, sources, shard = [], [], []
    for i, info in enumerate(manifest.shards):
        shard_ids, shard_sources = _read_rows_file(directory, info.rows)
        ids.append(shard_ids)
        sources.append(shard_sources)
        shard.append(np.full(len(shard_ids), i))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, np.int64)
    return np.concatenate(ids), np.concatenate(sources), np.concatenate(shard)


def fill_shard(template: np.ndarray, blocks, id_min: int, id_max: int, uri: str) -> int:
    """Add the vectors of ``blocks`` (``(ids, vectors)``) whose ids lie in ``[id_min, id_max]`` to a copy of the
    trained empty index ``template`` (serialised), write it to ``uri``; returns how many it holds."""
    index = faiss.deserialize_index(template)
    for ids, vectors in blocks:
        keep = (ids >= id_min) & (ids <= id_max)
        if keep.any():
            index.add_with_ids(np.ascontiguousarray(vectors[keep], np.float32), np.asarray(ids[keep], np.int64))
    write_index(index, uri)
    return int(index.ntotal)


def _fill_shard_from_tables(template: np.ndarray, tables: list[tuple], id_min: int, id_max: int, uri: str,
                            block_rows: int, transform=None) -> int:
    """:func:`fill_shard` over feature tables given as ``(uri, version, ids in view or None)``, reading only the
    shard's id range, block by block, where the shard is built (a Ray task: the driver never holds the gallery);
    ``transform(ids, vectors)`` changes each block first."""
    blocks = (block for s in _open_tables(tables) for block in s.global_blocks(block_rows, id_range=(id_min, id_max)))
    if transform is not None:
        blocks = ((ids, transform(ids, vectors)) for ids, vectors in blocks)
    return fill_shard(template, blocks, id_min, id_max, uri)


class AugmentedBlocks:
    """αDBA (:func:`rrt_dist.index.qe.database_augmentation`) as :func:`build_index`'s ``transform``, computed
    where each block is read: neighbours from ``actors`` (the shard actors of an index of the same tables without
    DBA), their vectors read from ``stores`` by id. No process holds the gallery."""

    def __init__(self, actors: list, stores, n: int, alpha: float):
        self.actors, self.tables, self.n, self.alpha = list(actors), table_refs(stores), n, alpha
        self._stores = None

    def __str__(self) -> str:
        return f"alpha-DBA n={self.n} alpha={self.alpha:g}"

    def __getstate__(self) -> dict:
        return {**vars(self), "_stores": None}        # tables are reopened where the blocks are read

    def __call__(self, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        if self._stores is None:
            self._stores = _open_tables(self.tables)
        return database_augmentation(partial(search_shards, self.actors),
                                     partial(take_globals_from, self._stores), vectors, ids, self.n, self.alpha)


def _trained_template(factory: str, d: int, read_sample) -> np.ndarray:
    """The index ``factory`` trained on ``read_sample()`` (called only when it needs training), serialised. Run
    as a Ray task reading the sample from the tables: a 200k × 2048 sample is 1.6 GB the driver never holds."""
    template = new_index(factory, d)
    if not template.is_trained:
        train(template, read_sample())
    return faiss.serialize_index(template)


def _run(fn, *args):
    """``fn(*args)`` as a Ray task reserving no CPU (index work never waits behind other stages)."""
    return ray.remote(num_cpus=0)(fn).remote(*args)


def _results(pending: list, desc: str, rows: list[int]) -> list:
    """The shard tasks' results in order, with a progress bar over the vectors they index (``rows`` per task:
    vectors/s and ETA, advancing as each shard completes)."""
    position = {ref: i for i, ref in enumerate(pending)}
    out, left = [None] * len(pending), list(pending)
    with tqdm(total=int(sum(rows)), desc=desc, unit="vec", unit_scale=True, mininterval=2.0) as bar:
        while left:
            done, left = ray.wait(left, num_returns=1)
            i = position[done[0]]
            out[i] = ray.get(done[0])
            bar.update(int(rows[i]))
    return out


@commits_index
def build_index(stores, directory: str, factory: str = "auto", n_shards: int = 1, train_size: int = 200_000,
                memory_budget: float = 8 * 2**30, seed: int = 0, transform=None,
                block_rows: int = 16384, previous: IndexManifest | None = None, reason: str = "") -> IndexManifest:
    """Build and commit a sharded index of every global descriptor in ``stores`` (one or several tables): version 1,
    or the version after ``previous`` (a rebuild, recorded with ``reason`` in its history).

    The driver holds the ids (8 bytes an image); a Ray task reads the training sample and trains, and each shard
    is filled by a Ray task that reads its own id range block by block.
    ``transform(ids, vectors) -> vectors`` changes every descriptor read before it is trained on and indexed
    (e.g. :class:`AugmentedBlocks`, database-side augmentation); the manifest records it as ``str(transform)``.
    """
    stores = _sources(stores)
    requested = {"factory": factory, "n_shards": n_shards, "train_size": train_size, "memory_budget": memory_budget,
                 "seed": seed}
    ids, sources = table_identities(stores)
    n, d = len(ids), stores[0].global_dim
    if n_shards > max(n, 1):
        log.warning("index: %d shards asked for %d vectors; using %d (a shard holds at least one vector)",
                    n_shards, n, max(n, 1))
        n_shards = max(n, 1)
    choice = ""
    if factory == "auto":
        factory, choice = choose_factory(n, d, memory_budget)
        log.info("index: chose %s because %s", factory, choice)
    start = time.perf_counter()
    version = previous.version + 1 if previous else 1
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, train_size), replace=False))
    tables = table_refs(stores)
    read_sample = partial(_read_globals, tables, ids[sample], transform)
    serialized = ray.get(ray.remote(_trained_template).remote(factory, d, read_sample))
    template_file = f"trained-v{version:06d}.faiss"
    write_index(faiss.deserialize_index(serialized), f"{directory}/{template_file}")
    bounds = shard_bounds(ids, n_shards)
    files = [_shard_file(i, version) for i in range(len(bounds))]
    tables_ref = ray.put(tables)
    counts = _results([_run(_fill_shard_from_tables, serialized, tables_ref, lo, hi, f"{directory}/{f}", block_rows,
                            transform) for (lo, hi), f in zip(bounds, files)], f"index build ({len(bounds)} shards)",
                      [int(((ids >= lo) & (ids <= hi)).sum()) for lo, hi in bounds])
    shards = []
    for (lo, hi), f, count in zip(bounds, files, counts):
        mine = (ids >= lo) & (ids <= hi)
        write_rows(f"{directory}/{_rows_file(f)}", ids[mine], sources[mine])
        shards.append(ShardInfo(f, int(lo), int(hi), count, rows=_rows_file(f)))
    history = list(previous.history) if previous else []
    history.append({"version": version, "action": "rebuild" if previous else "build", "rows": n,
                    "reason": reason or (choice and f"auto: {choice}"), "time": time.time()})
    manifest = IndexManifest(dimension=d, factory=factory, fingerprint=stores[0].fingerprint, choice=choice,
                             sources=[{"uri": s.uri, "version": s.version} for s in stores],
                             rows_digest=rows_digest(ids, sources), shards=shards, version=version,
                             template=template_file, built_rows=n, requested=requested, history=history,
                             transform="" if transform is None else str(transform))
    write_manifest(directory, manifest)
    collect_garbage(directory)
    log.info("index %s v%d: %d vectors in %d shard(s), %s, built in %.1fs", directory, version, n, len(bounds),
             factory, time.perf_counter() - start)
    return manifest


def _rewrite_shard(directory: str, source: str, tables: list[tuple], add_ids: np.ndarray, remove_ids: np.ndarray,
                   out: str) -> int:
    """Write ``out``: the index file ``source`` (a shard, or the trained template for a new delta shard) without
    ``remove_ids``, with the vectors of ``add_ids`` read from ``tables``; returns its count."""
    index = read_index(f"{directory}/{source}")
    if len(remove_ids):
        index.remove_ids(faiss.IDSelectorBatch(np.asarray(remove_ids, np.int64)))
    for start in range(0, len(add_ids), 16384):
        chunk = np.asarray(add_ids[start:start + 16384], np.int64)
        index.add_with_ids(np.ascontiguousarray(_read_globals(tables, chunk), np.float32), chunk)
    write_index(index, f"{directory}/{out}")
    return int(index.ntotal)


def _can_remove(factory: str) -> bool:
    return not factory.upper().startswith(("HNSW", "NSG"))   # graph indexes cannot delete (faiss)


def _rebuild(stores, directory: str, manifest: IndexManifest, why: str) -> IndexManifest:
    log.info("%s: %s", directory, why)
    requested = manifest.requested or {"factory": manifest.factory, "n_shards": len(manifest.shards)}
    return build_index(stores, directory, previous=manifest, reason=why, **requested)


@commits_index
def update_index(stores, directory: str, rebuild_fraction: float = 0.2) -> tuple[IndexManifest, dict]:
    """Bring the index at ``directory`` to the rows of ``stores`` in one new version (or none when it has them):
    rows gone from the tables or whose image changed are removed from their shards; new and changed rows go to
    delta shards (the open one, then new ones of a build shard's size), keeping the trained quantizer; when the
    rows outside the build would pass ``rebuild_fraction`` of the index, or rows must be removed from an index
    that cannot remove, it is retrained and rebuilt instead. Returns the manifest and ``{added, removed, action,
    reason}``. One writer at a time; readers are never disturbed (files are new, the commit one rename)."""
    stores = _sources(stores)
    manifest = read_manifest(directory)
    if stores[0].fingerprint != manifest.fingerprint:
        raise IndexMismatch(f"{stores[0].uri} holds another extractor's descriptors ({stores[0].fingerprint}) "
                            f"than {directory} ({manifest.fingerprint})")
    if manifest.transform:
        # added or rebuilt rows would be the stored vectors, not transformed ones (αDBA's depend on every
        # neighbourhood besides): a silently mixed index
        raise IndexMismatch(f"{directory} indexes transformed vectors ({manifest.transform}); it cannot be updated "
                            f"in place: build it again (rrt_dist.pipelines.index.ensure_index does)")
    if any(not s.rows for s in manifest.shards):
        why = "the index predates versioned shards (no rows files): rebuilt"
        return _rebuild(stores, directory, manifest, why), {"added": 0, "removed": 0, "action": "rebuild",
                                                            "reason": why}
    indexed, indexed_sources, shard = read_rows(directory, manifest)
    current, current_sources = table_identities(stores)
    source_of = dict(zip(current.tolist(), current_sources.tolist()))
    still = np.isin(indexed, current)
    changed = np.array([source_of[i] != s for i, s in zip(indexed[still].tolist(), indexed_sources[still].tolist())],
                       bool)
    remove = np.concatenate([indexed[~still], indexed[still][changed]])
    remove_shard = np.concatenate([shard[~still], shard[still][changed]])
    add = np.concatenate([current[~np.isin(current, indexed)], indexed[still][changed]])
    summary = {"added": int(len(add)), "removed": int(len(remove)), "action": "none", "reason": ""}
    if not len(add) and not len(remove):
        return manifest, summary
    delta_rows = sum(s.ntotal for s in manifest.shards if s.delta) + len(add) - int(
        sum(manifest.shards[i].delta for i in remove_shard))
    why = ""
    if delta_rows > rebuild_fraction * len(current):
        why = (f"{delta_rows} rows outside the build would be {delta_rows / max(1, len(current)):.1%} of "
               f"{len(current)}, more than rebuild_fraction={rebuild_fraction}: retrained and rebuilt")
    elif len(remove) and not _can_remove(manifest.factory):
        why = f"{len(remove)} rows changed or left the tables and {manifest.factory} cannot remove rows: rebuilt"
    if why:
        return _rebuild(stores, directory, manifest, why), {**summary, "action": "rebuild", "reason": why}
    version = manifest.version + 1
    tables = table_refs(stores)
    shards = [ShardInfo(**vars(s)) for s in manifest.shards]
    empty = np.zeros(0, np.int64)
    jobs = {int(i): [shards[i].file, empty, remove[remove_shard == i]] for i in np.unique(remove_shard)}
    # the open delta shard fills up to a build shard's size, then new delta shards are started
    capacity = max(1, math.ceil(manifest.built_rows / max(1, sum(not s.delta for s in shards))))
    pending = add
    while len(pending):
        last = len(shards) - 1
        if not (shards and shards[-1].delta) or shards[last].ntotal + len(jobs.get(last, [0, empty])[1]) >= capacity:
            shards.append(ShardInfo("", np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0, delta=True))
            last = len(shards) - 1
            jobs[last] = [manifest.template, empty, empty]
        job = jobs.setdefault(last, [shards[last].file, empty, empty])
        room = capacity - shards[last].ntotal - len(job[1])
        job[1], pending = np.concatenate([job[1], pending[:room]]), pending[room:]
    results = _results([_run(_rewrite_shard, directory, source, tables, adding, removing,
                             _shard_file(i, version)) for i, (source, adding, removing) in jobs.items()],
                       f"index update ({len(jobs)} shards)",
                       [shards[i].ntotal + len(adding) - len(removing) for i, (_, adding, removing) in jobs.items()])
    indexed_source = dict(zip(indexed.tolist(), indexed_sources.tolist()))
    for (i, (source, adding, removing)), count in zip(jobs.items(), results):
        old_ids = _read_rows_file(directory, shards[i].rows)[0] if shards[i].file else empty
        keep = old_ids[~np.isin(old_ids, removing)]
        rows_ids = np.concatenate([keep, adding])
        rows_sources = np.array([indexed_source[x] for x in keep.tolist()] + [source_of[x] for x in adding.tolist()],
                                dtype=object)
        shards[i].file, shards[i].ntotal = _shard_file(i, version), count
        shards[i].rows = _rows_file(shards[i].file)
        write_rows(f"{directory}/{shards[i].rows}", rows_ids, rows_sources)
    shards = [s for s in shards if s.ntotal or not s.delta]              # a delta emptied by removals goes
    fraction = delta_rows / max(1, len(current))
    reason = (f"{len(add)} rows added to delta shards, {len(remove)} removed; delta {delta_rows} rows = "
              f"{fraction:.1%} of the index, within rebuild_fraction={rebuild_fraction}: trained quantizer kept")
    updated = IndexManifest(**{**vars(manifest), "shards": shards, "version": version,
                               "sources": [{"uri": s.uri, "version": s.version} for s in stores],
                               "rows_digest": rows_digest(current, current_sources),
                               "history": manifest.history + [{"version": version, "action": "add",
                                                               "added": int(len(add)), "removed": int(len(remove)),
                                                               "reason": reason, "time": time.time()}]})
    write_manifest(directory, updated)
    collect_garbage(directory)
    log.info("%s v%d: %s", directory, version, reason)
    return updated, {**summary, "action": "add", "reason": reason}


class ShardActor:
    """Serves one shard file (on the GPU, fp16, when this actor has one); reloads it after a restart."""

    def __init__(self, directory: str, file: str, use_gpu: bool, params: str | None, threads: int):
        faiss.omp_set_num_threads(threads)  # Ray caps OpenMP at the actor's CPU reservation otherwise
        self.cpu_index = read_index(f"{directory}/{file}")
        self.index = self.cpu_index
        if use_gpu:                         # Ray gave this actor a GPU: the shard is served from it, or refused
            require_faiss_gpu("search")
            self.resources = faiss.StandardGpuResources()
            self.index = gpu_index(self.cpu_index, self.resources)
        if params:  # e.g. "nprobe=32" (IVF) or "efSearch=256" (HNSW), FAISS ParameterSpace syntax
            space = faiss.GpuParameterSpace() if use_gpu else faiss.ParameterSpace()
            space.set_index_parameters(self.index, params)

    def search(self, queries: np.ndarray, k: int):
        scores, ids = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return scores, ids

    def pid(self) -> int:
        return os.getpid()

    def acquire(self) -> int:
        """One more :class:`ShardedIndex` serves from this (shared) actor; returns its pid."""
        self.users = getattr(self, "users", 0) + 1
        return os.getpid()

    def release(self) -> None:
        """One fewer does; the last one out ends the actor (its file is no longer served by anyone)."""
        self.users = getattr(self, "users", 1) - 1
        if self.users <= 0:
            ray.actor.exit_actor()


def search_shards(actors: list, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of ``queries`` over shard actors (:class:`ShardActor`): each searched, top-k merged."""
    ref = ray.put(np.ascontiguousarray(queries, np.float32))
    return merge_results(ray.get([a.search.remote(ref, k) for a in actors]), k)


class ShardedIndex:
    """Fans query batches out to the shard actors of one committed version and merges their top-k (highest inner
    product first). :meth:`refresh` moves it to the newest version: actors for the changed shards start and load
    first, then searches switch over in one step, so every query is answered from a single version."""

    def __init__(self, directory: str, resources: SearchResources | None = None, params: str | None = None,
                 expected_fingerprint: str | None = None, version: int | None = None, shared: bool = False):
        """``version``: serve that committed version (default the newest). ``shared``: the shard actors are named
        by index and file and shared with every other shared :class:`ShardedIndex` of the same index in the Ray
        namespace (e.g. the replicas of a search service), each counted as a user: the last user to move on ends
        an actor, instead of every index starting (and holding in memory) its own copy of every shard."""
        self.directory, self.params, self.shared = directory, params, shared
        self.resources = resources or SearchResources(num_cpus=0)
        manifest = read_manifest(directory, version)
        if expected_fingerprint is not None and expected_fingerprint != manifest.fingerprint:
            raise IndexMismatch(f"{directory} indexes descriptors of extractor fingerprint {manifest.fingerprint}, "
                                f"queries come from {expected_fingerprint}: rebuild the index or use the same extractor")
        self._lock = threading.Lock()
        self._by_file: dict = {}
        self._retired: list[tuple[int, object]] = []   # (last version it served, actor)
        self._in_flight: dict[int, int] = {}            # version -> searches running on it
        self._serve(manifest)

    def _serve(self, manifest: IndexManifest) -> None:
        options = self.resources.actor_options(len(manifest.shards))
        started = {}
        for s in manifest.shards:
            if s.file in self._by_file:
                continue
            gpus = self.resources.shard_gpus(s.ntotal, len(manifest.shards))
            started[s.file] = self._start(s.file, {**options, "num_gpus": gpus})
        ray.get([a.pid.remote() for a in started.values()])          # loaded before any query goes to them
        with self._lock:
            by_file = {**self._by_file, **started}
            kept = {s.file for s in manifest.shards}
            if self._by_file:
                self._retired += [(self.manifest.version, a) for f, a in by_file.items() if f not in kept]
            self._by_file = {f: by_file[f] for f in kept}
            self.manifest = manifest
            self._actors = [by_file[s.file] for s in manifest.shards]
            self._release_retired()

    def _start(self, file: str, options: dict):
        args = (self.directory, file, options["num_gpus"] > 0, self.params, self.resources.threads)
        options = {"max_restarts": -1, "max_task_retries": -1, **options}
        if not self.shared:
            return ray.remote(ShardActor).options(**options).remote(*args)
        import hashlib

        name = f"shard-{hashlib.sha1(self.directory.encode()).hexdigest()[:12]}-{file}"
        actor = ray.remote(ShardActor).options(name=name, get_if_exists=True, **options)
        for attempt in range(3):      # the one found may end between getting it and counting in (its last user left)
            handle = actor.remote(*args)
            try:
                ray.get(handle.acquire.remote())
                return handle
            except ray.exceptions.RayActorError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _stop(self, actor) -> None:
        if self.shared:
            actor.release.remote()
        else:
            ray.kill(actor)

    def _release_retired(self) -> None:
        """Stop the shard actors of older versions that no running search uses any more (called under the lock)."""
        oldest_in_use = min(self._in_flight, default=self.manifest.version)
        for _, actor in [r for r in self._retired if r[0] < oldest_in_use]:
            self._stop(actor)
        self._retired = [r for r in self._retired if r[0] >= oldest_in_use]

    def refresh(self, version: int | None = None) -> bool:
        """Serve the newest committed version (or ``version``, e.g. the one a gallery snapshot pins) if it is not the
        one served; returns whether it changed."""
        if version is not None and version == self.manifest.version:
            return False
        manifest = read_manifest(self.directory, version)
        if manifest.version == self.manifest.version:
            return False
        self._serve(manifest)
        return True

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def actors(self) -> list:
        return list(self._actors)

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape ``[nq, k]``; rows are padded with -inf / -1 past the index size."""
        scores, ids, _ = self.search_versioned(queries, k)
        return scores, ids

    def search_versioned(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """:meth:`search`, and the index version that answered (one version per call, also during a refresh)."""
        queries = np.ascontiguousarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise IndexMismatch(f"queries of shape {queries.shape} for an index of dimension {self.dimension}")
        with self._lock:
            actors, version, manifest = self._actors, self.manifest.version, self.manifest
            self._in_flight[version] = self._in_flight.get(version, 0) + 1
        try:
            try:
                return (*search_shards(actors, queries, k), version)
            except ray.exceptions.RayActorError:
                if not self.shared or manifest is not self.manifest:
                    raise
                # a shared shard's owner (another index's process) is gone, and the shard with it: start it again
                log.warning("%s v%d: a shared shard actor was lost; starting it again", self.directory, version)
                with self._lock:
                    self._by_file = {}
                self._serve(manifest)
                return (*search_shards(self.actors, queries, k), version)
        finally:
            with self._lock:
                self._in_flight[version] -= 1
                if not self._in_flight[version]:
                    del self._in_flight[version]
                self._release_retired()

    def search_alpha_qe(self, queries: np.ndarray, k: int, vectors_of, n: int = 2, alpha: float = 0.3):
        return alpha_qe_search(self.search, vectors_of, queries, k, n, alpha)

    def add_from(self, stores, rebuild_fraction: float = 0.2) -> int:
        """:func:`update_index` with ``stores``, then serve the new version; returns how many rows were added."""
        _, summary = update_index(stores, self.directory, rebuild_fraction)
        self.refresh()
        return summary["added"]

    def close(self) -> None:
        with self._lock:
            for a in [*self._by_file.values(), *(a for _, a in self._retired)]:
                self._stop(a)
            self._by_file, self._retired, self._actors = {}, [], []


def write_neighbours(path: str, query_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
    """Neighbours table (Parquet): ``query_id``, ``neighbour_ids`` and ``scores``, best first, padding dropped."""
    rows_ids = [row[row != NO_ID] for row in ids]
    rows_scores = [s[row != NO_ID] for s, row in zip(scores, ids)]
    table = pa.table({"query_id": pa.array(np.asarray(query_ids, np.int64)),
                      "neighbour_ids": pa.array(rows_ids, pa.list_(pa.int64())),
                      "scores": pa.array(rows_scores, pa.list_(pa.float32()))})
    pq.write_table(table, path)
