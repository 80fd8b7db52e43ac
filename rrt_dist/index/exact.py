"""Exact inner-product search (FAISS ``IndexFlatIP``): the reference every approximate index is checked against."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import faiss
import numpy as np

from rrt_dist.schema import NO_ID

PAST_END = np.iinfo(np.int64).max        # position of the padding after a summarised ranking's entries


def exact_search(gallery: np.ndarray, gallery_ids: np.ndarray, queries: np.ndarray, k: int | None = None):
    """Top-``k`` gallery ids and scores per query, best first (``k=None``: rank the whole gallery).

    Rows are padded with id -1 / score -inf when the gallery has fewer than ``k`` vectors.
    """
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if gallery.shape[1:] != queries.shape[1:]:
        raise ValueError(f"dimension mismatch: gallery {gallery.shape[1:]} vs queries {queries.shape[1:]}")
    k = len(gallery) if k is None else k
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(gallery.shape[1]))
    index.add_with_ids(gallery, np.asarray(gallery_ids, dtype=np.int64))
    scores, ids = index.search(queries, k)
    scores[ids == NO_ID] = -np.inf
    return ids, scores


def _block_vectors(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, np.float32)
    if vectors.shape[1:] != queries.shape[1:]:
        raise ValueError(f"dimension mismatch: gallery {vectors.shape[1:]} vs queries {queries.shape[1:]}")
    return vectors


def exact_search_blocks(blocks, queries: np.ndarray, k: int | None = None, n_rows: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_search` over a gallery given as blocks ``(ids, vectors)`` (e.g. read from Lance), holding one
    block at a time: each block's top-``k`` goes into a ``faiss.ResultHeap``, as faiss's
    ``contrib.exhaustive_search`` does. ``k=None`` ranks the whole gallery (see :func:`rank_blocks`, and its
    ``n_rows``).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if k is None:
        return rank_blocks(blocks, queries, n_rows)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in blocks:
        if len(ids) == 0:
            continue
        vectors = _block_vectors(vectors, queries)
        scores, rows = faiss.knn(queries, vectors, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, np.asarray(ids, np.int64)[np.maximum(rows, 0)], NO_ID))
    heap.finalize()
    scores, ids = heap.D, heap.I
    scores[ids == NO_ID] = -np.inf
    return ids, scores


def rank_blocks(blocks, queries: np.ndarray, n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole gallery ranked per query: ids (int32 when every id fits, as revisitop's ranks do) and scores,
    best first, ties in gallery order. Holds the ``[n_queries, N]`` scores (70 queries × 1M images: 280 MB)
    and the ranked ids, never the ``[N, d]`` gallery; each query's row is sorted on its own. With ``n_rows``
    (the blocks' total) the scores are written in place, never held twice."""
    parts, block_ids, filled = [], [], 0
    scores = np.empty((len(queries), n_rows), np.float32) if n_rows is not None else None
    for ids, vectors in blocks:
        if len(ids) == 0:
            continue
        in_order = block_scores(queries, vectors, scores[:, filled:filled + len(ids)] if scores is not None else None)
        if scores is None:
            parts.append(in_order)
        block_ids.append(np.asarray(ids, np.int64))
        filled += len(ids)
    if not block_ids:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    if scores is None:
        scores = np.concatenate(parts, axis=1)
        del parts
    elif filled != n_rows:
        raise ValueError(f"the blocks held {filled} rows, not the {n_rows} announced")
    gallery_ids = np.concatenate(block_ids)
    fits = gallery_ids.min() >= np.iinfo(np.int32).min and gallery_ids.max() <= np.iinfo(np.int32).max
    ranked = np.empty(scores.shape, np.int32 if fits else np.int64)
    for q in range(len(scores)):
        order = np.argsort(-scores[q], kind="stable")
        ranked[q] = gallery_ids[order]
        scores[q] = scores[q][order]
    return ranked, scores


def block_scores(queries: np.ndarray, vectors: np.ndarray, out: np.ndarray | None = None,
                 device: str | None = None) -> np.ndarray:
    """IndexFlatIP's scores of ``queries`` against one block of gallery vectors, in the block's order
    (``[n_queries, len(block)]``; written into ``out`` when given). Every exact ranking scores through this, so
    two rankings of the same blocks with the same ``device`` agree to the bit. ``device=None``: FAISS on the CPU;
    a torch device (``"cuda"``): :func:`gpu_block_scores`, whose fp32 sums differ from FAISS's in the last bits
    only (the same ranking but for scores tied within ~1e-6)."""
    if device is not None:
        found = gpu_block_scores(queries, _block_vectors(vectors, queries), device)
        if out is None:
            return found
        out[...] = found
        return out
    found, rows = faiss.knn(queries, _block_vectors(vectors, queries), len(vectors), metric=faiss.METRIC_INNER_PRODUCT)
    out = np.empty_like(found) if out is None else out
    np.put_along_axis(out, rows, found, axis=1)
    return out


def gpu_block_scores(queries: np.ndarray, vectors: np.ndarray, device: str = "cuda") -> np.ndarray:
    """``queries @ vectors.T`` in fp32 on a torch ``device``, with TF32 off (TF32 keeps 10 mantissa bits: scores off
    by ~1e-3, enough to reorder a ranking). Per block the vectors cross PCIe once (8192 x 2048 fp32: 64 MB)."""
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        q = torch.as_tensor(queries, device=device)
        v = torch.as_tensor(vectors, device=device)
        return (q @ v.T).cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def rank_relevant_blocks(blocks: Callable[[], Iterable], queries: np.ndarray, relevant: Sequence[np.ndarray],
                         top: int, device: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a ranking metric needs of the whole ranking, without holding it: per query its first ``top`` entries
    and each of its ``relevant`` ids (e.g. revisitop's positives and junk) wherever it ranks, with their 0-based
    positions in the whole ranking (best first, ties in gallery order: exactly :func:`rank_blocks`'s order).

    ``blocks()`` yields the gallery's ``(ids, vectors)`` blocks, the same ones each call; it is read twice: once
    for the top entries and the relevant ids' scores, once to count what ranks above each relevant id. The driver
    holds one block's ``[n_queries, block]`` scores and ``top`` entries per query: O(1) in the gallery size.
    Returns ``ids``, ``scores`` and ``positions`` ``[n_queries, width]``, each row sorted by position, padded with
    -1 / -inf / :data:`PAST_END`. ``device``: where the blocks are scored (:func:`block_scores`).
    """
    queries = np.ascontiguousarray(queries, np.float32)
    nq = len(queries)
    wanted = np.unique(np.concatenate([np.asarray(r, np.int64) for r in relevant] or [np.zeros(0, np.int64)]))
    top_scores = np.full((nq, 0), -np.inf, np.float32)
    top_order = np.zeros((nq, 0), np.int64)
    top_ids = np.zeros((nq, 0), np.int64)
    found_ids, found_order, found_scores = [], [], []       # relevant ids present in the gallery
    offset = 0
    for ids, vectors in blocks():
        if len(ids) == 0:
            continue
        ids = np.asarray(ids, np.int64)
        scores = block_scores(queries, vectors, device=device)
        order = offset + np.arange(len(ids))
        merged_scores = np.concatenate([top_scores, scores], axis=1)
        merged_order = np.concatenate([top_order, np.broadcast_to(order, scores.shape)], axis=1)
        merged_ids = np.concatenate([top_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        keep = np.lexsort((merged_order, -merged_scores), axis=1)[:, :top]
        top_scores = np.take_along_axis(merged_scores, keep, 1)
        top_order = np.take_along_axis(merged_order, keep, 1)
        top_ids = np.take_along_axis(merged_ids, keep, 1)
        hit = np.flatnonzero(np.isin(ids, wanted))
        found_ids.append(ids[hit])
        found_order.append(order[hit])
        found_scores.append(scores[:, hit])
        offset += len(ids)
    found_ids = np.concatenate(found_ids) if found_ids else np.zeros(0, np.int64)
    found_order = np.concatenate(found_order) if found_order else np.zeros(0, np.int64)
    found_scores = np.concatenate(found_scores, axis=1) if found_scores else np.zeros((nq, 0), np.float32)
    column = {int(i): c for c, i in enumerate(found_ids)}
    # per query: the relevant ids it has in the gallery, their score and gallery order
    cols = [np.asarray([column[int(i)] for i in np.unique(np.asarray(r, np.int64)) if int(i) in column], np.int64)
            for r in relevant]
    rel_scores = [found_scores[q, c] for q, c in enumerate(cols)]
    above = [np.zeros(len(c), np.int64) for c in cols]
    offset = 0
    for ids, vectors in blocks():
        if len(ids) == 0:
            continue
        scores = block_scores(queries, vectors, device=device)
        ascending = np.sort(scores, axis=1)
        order = offset + np.arange(len(ids))
        for q, c in enumerate(cols):
            if not len(c):
                continue
            s, o = rel_scores[q], found_order[c]
            after = np.searchsorted(ascending[q], s, side="right")
            ties = after - np.searchsorted(ascending[q], s, side="left")
            for j in np.flatnonzero(ties):                   # equal scores rank in gallery order
                ties[j] = np.count_nonzero((scores[q] == s[j]) & (order < o[j]))
            above[q] += len(ids) - after + ties
        offset += len(ids)
    rows = []
    for q, c in enumerate(cols):
        beyond = above[q] >= top_ids.shape[1]
        ids_q = np.concatenate([top_ids[q], found_ids[c][beyond]])
        scores_q = np.concatenate([top_scores[q], rel_scores[q][beyond]])
        positions_q = np.concatenate([np.arange(top_ids.shape[1]), above[q][beyond]])
        order = np.argsort(positions_q, kind="stable")
        rows.append((ids_q[order], scores_q[order], positions_q[order]))
    width = max((len(r[0]) for r in rows), default=0)
    out_ids = np.full((nq, width), NO_ID, np.int64)
    out_scores = np.full((nq, width), -np.inf, np.float32)
    out_positions = np.full((nq, width), PAST_END, np.int64)
    for q, (i, s, p) in enumerate(rows):
        out_ids[q, :len(i)], out_scores[q, :len(i)], out_positions[q, :len(i)] = i, s, p
    return out_ids, out_scores, out_positions


def exact_searcher(gallery: np.ndarray, gallery_ids: np.ndarray):
    """``search(queries, k) -> (scores, ids)`` over ``gallery``: the searcher interface of αQE / DBA / evaluation."""
    def search(queries: np.ndarray, k: int | None):
        ids, scores = exact_search(gallery, gallery_ids, queries, k)
        return scores, ids

    return search


def streaming_searcher(stores, block_rows: int = 8192):
    """``search(queries, k) -> (scores, ids)`` by exact search over feature tables read block by block (the
    driver holds one block, not the gallery: 8192 × 2048-d is 32 MB as read, 64 MB as float32)."""
    return block_searcher(lambda: table_blocks(stores, block_rows), sum(len(store) for store in stores))


def block_searcher(blocks: Callable[[], Iterable], n_rows: int | None = None):
    """``search(queries, k) -> (scores, ids)`` by exact search over the gallery that ``blocks()`` yields as
    ``(ids, vectors)`` blocks, read anew for each search (``n_rows``: their total, see :func:`rank_blocks`)."""
    def search(queries: np.ndarray, k: int | None):
        ids, scores = exact_search_blocks(blocks(), queries, k, n_rows=n_rows)
        return scores, ids

    return search


def table_blocks(stores, block_rows: int = 8192):
    """The ``(ids, globals)`` blocks of feature tables, one after the other (the exact rankings' gallery order)."""
    return (block for store in stores for block in store.global_blocks(block_rows))
