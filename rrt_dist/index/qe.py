"""Query expansion baselines of the RRT paper, applied through any searcher.

- αQE (Radenović et al.): the new query is the L2-normalised sum of the query and its top-``n``
  neighbours, each weighted by ``max(similarity, 0) ** alpha`` (the query's own weight is 1, its
  self-similarity). The RRT paper tunes ``(n, alpha) = (2, 0.3)``.
- Database-side augmentation (αDBA): every gallery vector is replaced the same way by itself and
  its top-``n`` gallery neighbours before indexing.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rrt_dist.schema import NO_ID


def expand(vectors: np.ndarray, neighbour_vectors: np.ndarray, neighbour_scores: np.ndarray,
           alpha: float) -> np.ndarray:
    """``l2n(v + sum_i max(s_i, 0)^alpha * x_i)``; ``neighbour_vectors [N, n, d]``, scores ``[N, n]``."""
    weights = np.power(np.clip(neighbour_scores, 0, None), alpha)[..., None]
    out = vectors + (weights * neighbour_vectors).sum(axis=1)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def expanded_queries(search: Callable, vectors_of: Callable, queries: np.ndarray, n: int = 2,
                     alpha: float = 0.3) -> np.ndarray:
    """αQE's queries: each expanded with its top-``n`` results.

    ``search(queries, k) -> (scores, ids)``; ``vectors_of(ids [N, n]) -> [N, n, d]``.
    """
    scores, ids = search(queries, n)
    valid = ids != NO_ID
    return expand(queries, vectors_of(np.where(valid, ids, ids[:, :1])), np.where(valid, scores, 0.0), alpha)


def alpha_qe_search(search: Callable, vectors_of: Callable, queries: np.ndarray, k: int | None, n: int = 2,
                    alpha: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Search, expand each query with its top-``n`` results, search again (``k=None``: the whole ranking)."""
    return search(expanded_queries(search, vectors_of, queries, n, alpha), k)


def database_augmentation(search: Callable, vectors_of: Callable, vectors: np.ndarray, ids: np.ndarray, n: int = 2,
                          alpha: float = 0.3) -> np.ndarray:
    """αDBA of gallery ``vectors`` (any block of the gallery, ``ids`` theirs): each expanded with its top-``n``
    gallery neighbours, itself excluded. ``search`` searches the whole gallery; ``vectors_of(ids [N, n])``
    reads neighbours' vectors, so a block needs only its neighbours, never the gallery."""
    scores, nn = search(vectors, n + 1)
    keep = nn != ids[:, None]                         # drop the vector itself wherever it ranks
    order = np.argsort(~keep, axis=1, kind="stable")[:, :n]
    nn, scores = np.take_along_axis(nn, order, 1), np.take_along_axis(scores, order, 1)
    valid = nn != NO_ID
    # padding (a gallery of <= n vectors) reads the vector itself, with weight 0
    return expand(vectors, vectors_of(np.where(valid, nn, ids[:, None])), np.where(valid, scores, 0.0), alpha)
