"""Sharded index for a benchmark's feature tables: build once, add new rows incrementally, search (± αQE).

Indexes live in ``<index.dir>/<benchmark>/<extractor fingerprint>/<factory>-<shards>s[-dba<n>][-d]/``
(``-d`` when the distractors are indexed with the gallery).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from rrt_dist.index.core import read_manifest
from rrt_dist.index.exact import exact_searcher
from rrt_dist.index.qe import database_augmentation
from rrt_dist.index.sharded import ShardedIndex, build_index
from rrt_dist.store import FeatureStore, concat_globals

log = logging.getLogger(__name__)


def index_directory(cfg, benchmark: str, fingerprint: str, with_distractors: bool) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.factory) + f"-{cfg.n_shards}s"
    name += f"-dba{cfg.dba_n}" if cfg.dba_n else ""
    name += "-d" if with_distractors else ""
    return str(Path(cfg.dir) / benchmark / fingerprint / name)


def indexed_tables(cfg, stores: dict) -> list[str]:
    """The feature tables an index holds: the gallery, and the distractors unless ``with_distractors`` is off."""
    return ["gallery"] + (["distractor"] if cfg.with_distractors and "distractor" in stores else [])


def ensure_index(cfg, benchmark: str, stores: list[FeatureStore]) -> ShardedIndex:
    """Open the index of ``stores`` (building it, or adding rows it lacks) and start its shard actors."""
    with_distractors = len(stores) > 1
    directory = index_directory(cfg, benchmark, stores[0].fingerprint, with_distractors)
    try:
        read_manifest(directory)
        built = True
    except FileNotFoundError:
        built = False
    if not built:
        vectors = None
        if cfg.dba_n:
            ids, vectors = concat_globals(stores)
            vectors = database_augmentation(exact_searcher(vectors, ids), vectors, ids, cfg.dba_n, cfg.dba_alpha)
        build_index(stores, directory, cfg.factory, cfg.n_shards, cfg.train_size, cfg.memory_budget_gb * 2**30,
                    vectors=vectors)
    index = ShardedIndex(directory, use_gpu=cfg.use_gpu, params=cfg.params, expected_fingerprint=stores[0].fingerprint)
    if built:
        if cfg.dba_n:
            log.warning("%s: incremental add is not defined with DBA (neighbourhoods change); rebuild instead", directory)
        else:
            added = index.add_from(stores)
            if added:
                log.info("%s: added %d new rows", directory, added)
    return index


def search(index: ShardedIndex, cfg, queries: np.ndarray, k: int, vectors_of) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per query, with αQE when ``cfg.qe_n`` > 0."""
    if cfg.qe_n:
        return index.search_alpha_qe(queries, k, vectors_of, cfg.qe_n, cfg.qe_alpha)
    return index.search(queries, k)


def setting_indexes(cfg, bench, stores: dict) -> dict:
    """One sharded index per evaluation setting (gallery; gallery + distractors) when ``cfg.k`` is set.

    Without ``k`` the evaluation ranks the whole gallery exactly (the revisitop protocol) and
    needs no index.
    """
    from rrt_dist.eval.runner import settings_of

    if not cfg.k:
        return {}
    return {setting: ensure_index(cfg, bench.name, [stores["gallery"]] + ([stores["distractor"]] if with_d else []))
            for setting, with_d in settings_of(bench).items()}
