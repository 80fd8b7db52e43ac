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

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from rrt_dist.datasets.base import NO_ID
from rrt_dist.runtime import StageResources
from rrt_dist.store import FeatureStore, concat_globals

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


def build_index(stores, directory: str, factory: str = "auto", n_shards: int = 1, train_size: int = 200_000,
                memory_budget: float = 8 * 2**30, seed: int = 0, vectors: np.ndarray | None = None) -> IndexManifest:
    """Build and persist a sharded index of every global descriptor in ``stores`` (one or several tables).

    ``vectors`` replaces the tables' descriptors (same order as their concatenated ``globals()``),
    e.g. after database-side augmentation.
    """
    stores = _sources(stores)
    ids, table_vectors = concat_globals(stores)
    vectors = table_vectors if vectors is None else vectors
    n, d = vectors.shape
    if n_shards > max(n, 1):
        log.warning("index: %d shards asked for %d vectors; using %d (a shard holds at least one vector)",
                    n_shards, n, max(n, 1))
        n_shards = max(n, 1)
    choice = ""
    if factory == "auto":
        factory, choice = choose_factory(n, d, memory_budget)
        log.info("index: chose %s because %s", factory, choice)
    start = time.perf_counter()
    template = new_index(factory, d)
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(n, size=min(n, train_size), replace=False)] if not template.is_trained else None
    if sample is not None:
        train(template, sample)
    bounds = shard_bounds(ids, n_shards)
    manifest = IndexManifest(dimension=d, factory=factory, fingerprint=stores[0].fingerprint, choice=choice,
                             sources=[{"uri": s.uri, "version": s.version} for s in stores],
                             rows_digest=rows_digest(*table_identities(stores)))
    which = shard_of(ids, [ShardInfo("", lo, hi) for lo, hi in bounds])
    for i, (lo, hi) in enumerate(tqdm(bounds, desc="build shards", unit="shard", disable=n_shards < 2)):
        index = faiss.clone_index(template)
        rows = np.flatnonzero(which == i)
        for s in range(0, len(rows), 100_000):          # bounded memory for the float32 copy
            part = rows[s:s + 100_000]
            index.add_with_ids(np.ascontiguousarray(vectors[part], np.float32), ids[part])
        write_index(index, f"{directory}/{_shard_file(i)}")
        manifest.shards.append(ShardInfo(_shard_file(i), int(lo), int(hi), int(index.ntotal)))
    write_manifest(directory, manifest)
    log.info("index %s: %d vectors in %d shard(s), %s, built in %.1fs", directory, n, n_shards, factory,
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

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> int:
        """Add vectors whose ids are not in the shard yet, then persist it; returns the new count."""
        new = ~np.isin(ids, index_ids(self.cpu_index))
        if new.any():
            self.cpu_index.add_with_ids(np.ascontiguousarray(vectors[new], np.float32), ids[new])
            if self.index is not self.cpu_index:
                self.index.add_with_ids(np.ascontiguousarray(vectors[new], np.float32), ids[new])
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
        ids, vectors = concat_globals(stores)
        new = ~np.isin(ids, indexed)
        which = shard_of(ids[new], self.manifest.shards)
        counts = ray.get([a.add.remote(vectors[new][which == i], ids[new][which == i])
                          for i, a in enumerate(self.actors)])
        for info, count in zip(self.manifest.shards, counts):
            info.ntotal = count
        versions = {s["uri"]: s for s in self.manifest.sources}
        versions.update({s.uri: {"uri": s.uri, "version": s.version} for s in stores})
        self.manifest.sources = list(versions.values())
        self.manifest.rows_digest = rows_digest(current_ids, current_sources)
        write_manifest(self.directory, self.manifest)
        return int(new.sum())

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
