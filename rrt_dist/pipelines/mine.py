"""Mining pairs taught by geometric verification (``train.pairs=gv``): each gallery image's global top-k and random
partners, verified by the GV rerank pool, written block by block (``rrt_dist.train.gv_pairs`` says what the pairs
are).

The gallery is mined ``block_rows`` anchors at a time: their globals are read by id and searched (the exact searcher
streams the gallery through, or the sharded index answers), their partners drawn, and every (anchor, candidate) pair
scored by a :class:`~rrt_dist.pipelines.rerank.RerankPool` of the ``gv`` scorer, whose actors read the descriptors
from the table themselves. A block is one Parquet file (anchor, candidate, global score, inliers, random), written
whole or not at all, and its pool lives only as long as the block (its cache of scored pairs stays a block's), so a
rerun mines only the missing blocks and the driver holds one block's lists at a time: at 1M images the whole
mining is 1M x (k + r) rows on disk, never a gallery x gallery matrix or the gallery's locals in memory.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rrt_dist.schema import NO_ID
from rrt_dist.train.gv_pairs import random_partners

log = logging.getLogger(__name__)

PAIRS_SCHEMA = pa.schema([("anchor", pa.int64()), ("candidate", pa.int64()), ("global", pa.float32()),
                          ("inliers", pa.int32()), ("random", pa.bool_())])


def top_k_without_self(anchor_ids: np.ndarray, found: np.ndarray, scores: np.ndarray, k: int):
    """Each row's first ``k`` found ids other than its anchor (and the padding), with their scores."""
    ids = np.full((len(anchor_ids), k), NO_ID, np.int64)
    out_scores = np.full((len(anchor_ids), k), np.nan, np.float32)
    for r, (anchor, row, score) in enumerate(zip(anchor_ids, found, scores)):
        keep = (row != anchor) & (row != NO_ID)
        ids[r, :min(k, keep.sum())], out_scores[r, :min(k, keep.sum())] = row[keep][:k], score[keep][:k]
    return ids, out_scores


def mine_block(anchor_ids: np.ndarray, vectors: np.ndarray, gallery_ids: np.ndarray, search, pool, neighbours: int,
               random: int, seed: int) -> pa.Table:
    """The mined pairs of one block of anchors: their global top-``neighbours`` by ``search`` (self left out) and
    ``random`` random partners not among them, each pair's inliers from ``pool`` (a GV RerankPool)."""
    scores, found = search(vectors, min(neighbours + 1, len(gallery_ids)))
    top, top_scores = top_k_without_self(anchor_ids, np.asarray(found, np.int64), np.asarray(scores), neighbours)
    partners = random_partners(anchor_ids, gallery_ids, random, seed)
    partners[(partners[:, :, None] == top[:, None, :]).any(axis=2)] = NO_ID      # already a neighbour: mined once
    candidates = np.concatenate([top, partners], axis=1)
    order = np.argsort(candidates == NO_ID, axis=1, kind="stable")           # padding last: the pool stops there
    candidates = np.take_along_axis(candidates, order, axis=1)
    is_random = np.take_along_axis(np.concatenate([np.zeros_like(top, bool), np.ones_like(partners, bool)], 1),
                                   order, axis=1)
    global_scores = np.take_along_axis(np.concatenate([top_scores, np.full(partners.shape, np.nan, np.float32)], 1),
                                       order, axis=1)
    ordered, inliers = pool.rerank_with_scores(np.asarray(anchor_ids, np.int64), candidates,
                                               np.nan_to_num(global_scores, nan=-1.0), candidates.shape[1])
    columns: dict[str, list] = {name: [] for name in PAIRS_SCHEMA.names}
    for r, anchor in enumerate(anchor_ids):
        valid = candidates[r] != NO_ID
        counts = dict(zip(ordered[r][:valid.sum()].tolist(), inliers[r][:valid.sum()].tolist()))
        columns["anchor"] += [int(anchor)] * int(valid.sum())
        columns["candidate"] += candidates[r][valid].tolist()
        columns["global"] += global_scores[r][valid].tolist()
        columns["inliers"] += [int(counts[c]) for c in candidates[r][valid].tolist()]
        columns["random"] += is_random[r][valid].tolist()
    return pa.table(columns, schema=PAIRS_SCHEMA)


def mine_pairs(store, ids: np.ndarray, search, open_gv_pool, folder: str | Path, neighbours: int, random: int,
               seed: int, block_rows: int) -> Path:
    """Mine every anchor of ``ids`` (rows of ``store``; the searched gallery, in id order) into ``folder``, block by
    block, skipping the blocks already there; returns ``folder``. ``open_gv_pool()`` opens a GV RerankPool over the
    table, ``search(vectors, k) -> (scores, ids)`` searches the gallery."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.sort(np.asarray(ids, np.int64))
    blocks = range(0, len(ids), block_rows)
    todo = [s for s in blocks if not (folder / f"block_{s // block_rows:06d}.parquet").is_file()]
    if len(todo) < len(blocks):
        log.info("mining %s: %d of %d blocks already mined", folder, len(blocks) - len(todo), len(blocks))
    start = time.perf_counter()
    for n, s in enumerate(todo):
        block = ids[s:s + block_rows]
        pool = open_gv_pool()
        try:
            table = mine_block(block, store.take_globals(block), ids, search, pool, neighbours, random, seed)
        finally:
            pool.close()
        path = folder / f"block_{s // block_rows:06d}.parquet"
        pq.write_table(table, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)                      # whole or not at all: a rerun redoes a torn block
        elapsed = time.perf_counter() - start
        done = sum(min(block_rows, len(ids) - t) for t in todo[:n + 1])
        log.info("mined %d / %d anchors (%.1f anchors/s, %d pairs verified), ETA %.0f s", done,
                 sum(min(block_rows, len(ids) - t) for t in todo), done / elapsed, table.num_rows,
                 elapsed / done * (sum(min(block_rows, len(ids) - t) for t in todo) - done))
    return folder


def mined_blocks(folder: str | Path):
    """The mined pairs, one block (a pyarrow Table) at a time, in anchor id order."""
    for path in sorted(Path(folder).glob("block_*.parquet")):
        yield pq.read_table(path)
