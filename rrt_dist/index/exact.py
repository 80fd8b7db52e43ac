"""Exact inner-product search (FAISS ``IndexFlatIP``): the reference every approximate index is checked against."""
from __future__ import annotations

import faiss
import numpy as np

from rrt_dist.datasets.base import NO_ID


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
        # IndexFlatIP's own scores (faiss.knn over the block), put back in gallery order
        found, rows = faiss.knn(queries, _block_vectors(vectors, queries), len(ids), metric=faiss.METRIC_INNER_PRODUCT)
        in_order = scores[:, filled:filled + len(ids)] if scores is not None else np.empty_like(found)
        np.put_along_axis(in_order, rows, found, axis=1)
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


def exact_searcher(gallery: np.ndarray, gallery_ids: np.ndarray):
    """``search(queries, k) -> (scores, ids)`` over ``gallery``: the searcher interface of αQE / DBA / evaluation."""
    def search(queries: np.ndarray, k: int | None):
        ids, scores = exact_search(gallery, gallery_ids, queries, k)
        return scores, ids

    return search


def streaming_searcher(stores, block_rows: int = 8192):
    """``search(queries, k) -> (scores, ids)`` by exact search over feature tables read block by block (the
    driver holds one block, not the gallery: 8192 × 2048-d is 32 MB as read, 64 MB as float32)."""
    def search(queries: np.ndarray, k: int | None):
        blocks = (block for store in stores for block in store.global_blocks(block_rows))
        ids, scores = exact_search_blocks(blocks, queries, k, n_rows=sum(len(store) for store in stores))
        return scores, ids

    return search
