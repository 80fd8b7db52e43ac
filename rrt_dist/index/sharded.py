"""Sharded FAISS index served by Ray actors (one per shard), with build, incremental add and persistence.

Layout of an index directory (local path or fsspec URI)::

    manifest.json      dimension, metric, factory, shards (file, id range, count), source table + Lance
                       version, extractor fingerprint, why ``auto`` chose the factory
    shard-00000.faiss  one FAISS index per contiguous id range

A shard actor is restarted by Ray if it dies and reloads its shard from the directory; the
searcher retries the call. Queries from another extractor than the one indexed are refused.
"""
from __future__ import annotations

import logging
import os
import time
from functools import partial

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from rrt_dist.datasets.base import NO_ID
from rrt_dist.runtime import StageResources
from rrt_dist.store import FeatureStore, take_globals_from

from .core import (IndexManifest, IndexMismatch, ShardInfo, choose_factory, index_ids, merge_results, new_index,
                   read_index, read_manifest, rows_digest, shard_bounds, shard_of, train, write_index, write_manifest)
from .qe import alpha_qe_search

log = logging.getLogger(__name__)


def _shard_file(i: int) -> str:
    return f"shard-{i:05d}.faiss"


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


class StaleIndex(RuntimeError):
    """The index holds rows its feature tables no longer have as indexed (re-extracted or gone)."""


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
                            block_rows: int) -> int:
    """:func:`fill_shard` over feature tables given as ``(uri, version, ids in view or None)``, reading only the
    shard's id range, block by block, where the shard is built (a Ray task: the driver never holds the gallery)."""
    blocks = (block for s in _open_tables(tables) for block in s.global_blocks(block_rows, id_range=(id_min, id_max)))
    return fill_shard(template, blocks, id_min, id_max, uri)


def _open_tables(tables: list[tuple]) -> list[FeatureStore]:
    return [FeatureStore(u, v, only=only) for u, v, only in tables]


def _read_globals(tables: list[tuple], ids: np.ndarray) -> np.ndarray:
    return take_globals_from(_open_tables(tables), ids)


def _trained_template(factory: str, d: int, read_sample) -> np.ndarray:
    """The index ``factory`` trained on ``read_sample()`` (called only when it needs training), serialised. Run
    as a Ray task reading the sample from the tables: a 200k × 2048 sample is 1.6 GB the driver never holds."""
    template = new_index(factory, d)
    if not template.is_trained:
        train(template, read_sample())
    return faiss.serialize_index(template)


def build_index(stores, directory: str, factory: str = "auto", n_shards: int = 1, train_size: int = 200_000,
                memory_budget: float = 8 * 2**30, seed: int = 0, vectors: np.ndarray | None = None,
                block_rows: int = 16384) -> IndexManifest:
    """Build and persist a sharded index of every global descriptor in ``stores`` (one or several tables).

    The driver holds the ids (8 bytes an image); a Ray task reads the training sample and trains, and each shard
    is filled by a Ray task (in process without Ray) that reads its own id range block by block. ``vectors``
    replaces the tables' descriptors (same order as their concatenated ids), e.g. after database-side
    augmentation, which needs them all anyway: then shards are filled from it in process.
    """
    stores = _sources(stores)
    ids = np.concatenate([s.ids for s in stores])
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
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, train_size), replace=False))
    tables = [(s.uri, s.version, s.ids if s.restricted else None) for s in stores]
    if vectors is not None:
        serialized = _trained_template(factory, d, lambda: vectors[sample])
    elif ray.is_initialized():
        serialized = ray.get(ray.remote(_trained_template).remote(factory, d, partial(_read_globals, tables,
                                                                                      ids[sample])))
    else:
        serialized = _trained_template(factory, d, partial(_read_globals, tables, ids[sample]))
    bounds = shard_bounds(ids, n_shards)
    manifest = IndexManifest(dimension=d, factory=factory, fingerprint=stores[0].fingerprint, choice=choice,
                             sources=[{"uri": s.uri, "version": s.version} for s in stores],
                             rows_digest=rows_digest(*table_identities(stores)))
    uris = [f"{directory}/{_shard_file(i)}" for i in range(len(bounds))]
    if vectors is not None:
        blocks = [(ids[s:s + block_rows], vectors[s:s + block_rows]) for s in range(0, n, block_rows)]
        counts = [fill_shard(serialized, blocks, lo, hi, uri) for (lo, hi), uri in zip(bounds, uris)]
    elif ray.is_initialized():     # reserving no CPU, like the shard actors: never waits behind other stages
        task = ray.remote(num_cpus=0)(_fill_shard_from_tables)
        tables_ref = ray.put(tables)
        counts = ray.get([task.remote(serialized, tables_ref, lo, hi, uri, block_rows)
                          for (lo, hi), uri in zip(bounds, uris)])
    else:
        counts = [_fill_shard_from_tables(serialized, tables, lo, hi, uri, block_rows)
                  for (lo, hi), uri in zip(bounds, uris)]
    manifest.shards = [ShardInfo(_shard_file(i), int(lo), int(hi), count)
                       for i, ((lo, hi), count) in enumerate(zip(bounds, counts))]
    write_manifest(directory, manifest)
    log.info("index %s: %d vectors in %d shard(s), %s, built in %.1fs", directory, n, len(bounds), factory,
             time.perf_counter() - start)
    return manifest


class ShardActor:
    """Holds one shard (on the GPU, fp16, when this actor has one); reloads it after a restart."""

    def __init__(self, directory: str, shard: int, use_gpu: bool, params: str | None, threads: int):
        self.directory, self.shard = directory, shard
        faiss.omp_set_num_threads(threads)  # Ray caps OpenMP at the actor's CPU reservation otherwise
        info = read_manifest(directory).shards[shard]
        self.cpu_index = read_index(f"{directory}/{info.file}")
        self.index = self.cpu_index
        if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            options = faiss.GpuClonerOptions()
            options.useFloat16 = True
            self.resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self.resources, 0, self.cpu_index, options)
        if params:  # e.g. "nprobe=32" (IVF) or "efSearch=256" (HNSW), FAISS ParameterSpace syntax
            faiss.ParameterSpace().set_index_parameters(self.index, params)

    def search(self, queries: np.ndarray, k: int):
        scores, ids = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return scores, ids

    def add(self, tables: list[tuple], ids: np.ndarray) -> int:
        """Add the rows ``ids`` not in the shard yet, read here from the feature tables (``(uri, version)``),
        then persist it; returns the new count."""
        ids = np.asarray(ids, np.int64)
        new = ids[~np.isin(ids, index_ids(self.cpu_index))]
        if len(new):
            vectors = take_globals_from([FeatureStore(*t) for t in tables], new)
            self.cpu_index.add_with_ids(vectors, new)
            if self.index is not self.cpu_index:
                self.index.add_with_ids(vectors, new)
            write_index(self.cpu_index, f"{self.directory}/{read_manifest(self.directory).shards[self.shard].file}")
        return int(self.cpu_index.ntotal)

    def ids(self) -> np.ndarray:
        return index_ids(self.cpu_index)

    def pid(self) -> int:
        return os.getpid()


class ShardedIndex:
    """Fans query batches out to the shard actors and merges their top-k (highest inner product first)."""

    def __init__(self, directory: str, resources: StageResources | None = None, params: str | None = None,
                 expected_fingerprint: str | None = None):
        self.directory = directory
        self.manifest = read_manifest(directory)
        if expected_fingerprint is not None and expected_fingerprint != self.manifest.fingerprint:
            raise IndexMismatch(f"{directory} indexes descriptors of extractor fingerprint {self.manifest.fingerprint}, "
                                f"queries come from {expected_fingerprint}: rebuild the index or use the same extractor")
        n_shards = len(self.manifest.shards)
        resources = resources or StageResources(num_cpus=0)
        options = resources.actor_options(n_shards)
        actor = ray.remote(ShardActor).options(max_restarts=-1, max_task_retries=-1, **options)
        self.actors = [actor.remote(directory, i, options["num_gpus"] > 0, params, resources.threads)
                       for i in range(n_shards)]

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape ``[nq, k]``; rows are padded with -inf / -1 past the index size."""
        queries = np.ascontiguousarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise IndexMismatch(f"queries of shape {queries.shape} for an index of dimension {self.dimension}")
        ref = ray.put(queries)
        parts = ray.get([a.search.remote(ref, k) for a in self.actors])
        return merge_results(parts, k)

    def search_alpha_qe(self, queries: np.ndarray, k: int, vectors_of, n: int = 2, alpha: float = 0.3):
        return alpha_qe_search(self.search, vectors_of, queries, k, n, alpha)

    def add_from(self, stores) -> int:
        """Incremental add: index every row of ``stores`` not indexed yet; returns how many were added.

        Raises :class:`StaleIndex` when an indexed row is gone from the tables or was re-extracted since
        (its image changed): adding cannot fix that, the index must be rebuilt."""
        stores = _sources(stores)
        if stores[0].fingerprint != self.manifest.fingerprint:
            raise IndexMismatch(f"{stores[0].uri} holds another extractor's descriptors ({stores[0].fingerprint}) "
                                f"than {self.directory} ({self.manifest.fingerprint})")
        indexed = np.concatenate(ray.get([a.ids.remote() for a in self.actors]))
        current_ids, current_sources = table_identities(stores)
        was_indexed = np.isin(current_ids, indexed)
        if was_indexed.sum() != len(indexed):
            raise StaleIndex(f"{self.directory}: {len(indexed) - int(was_indexed.sum())} indexed rows are no longer in "
                             f"the feature tables")
        if rows_digest(current_ids[was_indexed], current_sources[was_indexed]) != self.manifest.rows_digest:
            raise StaleIndex(f"{self.directory}: indexed rows were re-extracted since (their images changed)")
        new = current_ids[~was_indexed]                 # each shard actor reads its own new rows' vectors
        which = shard_of(new, self.manifest.shards)
        tables = [(s.uri, s.version) for s in stores]
        counts = ray.get([a.add.remote(tables, new[which == i]) for i, a in enumerate(self.actors)])
        for info, count in zip(self.manifest.shards, counts):
            info.ntotal = count
        versions = {s["uri"]: s for s in self.manifest.sources}
        versions.update({s.uri: {"uri": s.uri, "version": s.version} for s in stores})
        self.manifest.sources = list(versions.values())
        self.manifest.rows_digest = rows_digest(current_ids, current_sources)
        write_manifest(self.directory, self.manifest)
        return len(new)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)


def write_neighbours(path: str, query_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
    """Neighbours table (Parquet): ``query_id``, ``neighbour_ids`` and ``scores``, best first, padding dropped."""
    rows_ids = [row[row != NO_ID] for row in ids]
    rows_scores = [s[row != NO_ID] for s, row in zip(scores, ids)]
    table = pa.table({"query_id": pa.array(np.asarray(query_ids, np.int64)),
                      "neighbour_ids": pa.array(rows_ids, pa.list_(pa.int64())),
                      "scores": pa.array(rows_scores, pa.list_(pa.float32()))})
    pq.write_table(table, path)
