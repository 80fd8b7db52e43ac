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


def exact_searcher(gallery: np.ndarray, gallery_ids: np.ndarray):
    """``search(queries, k) -> (scores, ids)`` over ``gallery``: the searcher interface of αQE / DBA / evaluation."""
    def search(queries: np.ndarray, k: int | None):
        ids, scores = exact_search(gallery, gallery_ids, queries, k)
        return scores, ids

    return search
