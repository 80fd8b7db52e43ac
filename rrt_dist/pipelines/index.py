"""Sharded index for a benchmark's feature tables: build once, add new rows incrementally, search (± αQE).

Indexes live in ``<index.dir>/<benchmark>/<extractor fingerprint>/<tables>/<factory>-<shards>s[-dba<n>-a<alpha>][-d]/``
(``<tables>``: which feature tables; ``-d`` when the distractors are indexed with the gallery).
"""
from __future__ import annotations

import hashlib
import logging
import re

import numpy as np
from omegaconf import OmegaConf

from rrt_dist.features.images import join_location
from rrt_dist.index.core import read_manifest, rows_digest
from rrt_dist.index.sharded import AugmentedBlocks, ShardedIndex, build_index, table_identities, update_index
from rrt_dist.schema import SearchResources
from rrt_dist.store import FeatureStore
from rrt_dist.store.locks import writer_lock

log = logging.getLogger(__name__)


def index_directory(cfg, benchmark: str, stores: list[FeatureStore]) -> str:
    """``<index.dir>/<benchmark>/<fingerprint>/<tables>/<factory>-<shards>s[-dba<n>-a<alpha>][-d]``: ``<tables>`` names the
    feature tables indexed (so two datasets of one benchmark type never share an index)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.factory) + f"-{cfg.n_shards}s"
    name += f"-dba{cfg.dba_n}-a{cfg.dba_alpha:g}" if cfg.dba_n else ""
    name += "-d" if len(stores) > 1 else ""
    tables = hashlib.sha1("|".join(sorted(s.uri for s in stores)).encode()).hexdigest()[:10]
    return join_location(cfg.dir, benchmark, stores[0].fingerprint, tables, name)


def indexed_tables(cfg, stores: dict) -> list[str]:
    """The feature tables an index holds: the gallery, and the distractors unless ``with_distractors`` is off."""
    return ["gallery"] + (["distractor"] if cfg.with_distractors and "distractor" in stores else [])


def ensure_index(cfg, benchmark: str, stores: list[FeatureStore], resources: SearchResources | None = None
                 ) -> ShardedIndex:
    """Open the index of ``stores`` (building it, or committing a version with the rows it lacks and without
    those that changed or left the tables) and start its shard actors, each asking for ``resources``
    (``ray.search``). One writer at a time per index (``<directory>.lock``); searchers never wait for it."""
    directory = index_directory(cfg, benchmark, stores)
    with writer_lock(directory, f"index {directory}"):
        try:
            manifest = read_manifest(directory)
        except FileNotFoundError:
            manifest = None
        if manifest is None:
            _build(cfg, benchmark, stores, directory, resources)
        elif cfg.dba_n:
            if manifest.rows_digest != rows_digest(*table_identities(stores)):
                # DBA vectors depend on every neighbourhood: any change means a rebuild.
                _build(cfg, benchmark, stores, directory, resources, manifest,
                       "the feature tables changed and DBA vectors depend on every neighbourhood")
        else:
            _, summary = update_index(stores, directory, cfg.rebuild_fraction)
            if summary["action"] != "none":
                log.info("%s: %s", directory, summary["reason"])
    return ShardedIndex(directory, resources=resources, params=cfg.params, expected_fingerprint=stores[0].fingerprint)


def _build(cfg, benchmark: str, stores: list[FeatureStore], directory: str, resources: SearchResources | None,
           previous=None, reason: str = "") -> None:
    plain, transform = None, None
    if cfg.dba_n:
        # αDBA's neighbours: searched in the same tables' index without DBA (built, or updated, as any index),
        # block by block where each shard is filled
        plain = ensure_index(OmegaConf.merge(cfg, {"dba_n": 0}), benchmark, stores, resources)
        transform = AugmentedBlocks(plain.actors, stores, cfg.dba_n, cfg.dba_alpha)
    try:
        build_index(stores, directory, cfg.factory, cfg.n_shards, cfg.train_size, cfg.memory_budget_gb * 2**30,
                    transform=transform, previous=previous, reason=reason)
    finally:
        if plain is not None:
            plain.close()


def search(index: ShardedIndex, queries: np.ndarray, k: int, vectors_of, aqe=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per query; expanded by αQE first when ``aqe`` (``reranker.aqe``) is given."""
    if aqe is not None:
        return index.search_alpha_qe(queries, k, vectors_of, aqe.n, aqe.alpha)
    return index.search(queries, k)


def setting_indexes(cfg, bench, stores: dict, resources: SearchResources | None = None) -> dict:
    """One sharded index per evaluation setting (gallery; gallery + distractors) in ``mode=sharded``.

    In ``mode=exact`` the evaluation ranks the whole gallery exactly (the protocols' definition) and
    needs no index.
    """
    from rrt_dist.eval.runner import settings_of

    if cfg.mode == "exact":
        return {}
    return {setting: ensure_index(cfg, bench.name, [stores["gallery"]] + ([stores["distractor"]] if with_d else []),
                                  resources)
            for setting, with_d in settings_of(bench).items()}
