"""SuperGlobal reranking (Shao et al., "Global Features are All You Need for Image Retrieval and Reranking",
ICCV 2023): the global top-M reordered from the global descriptors alone, no local features stored.

For one query ``q`` and its top-M candidates ``X`` (``M × d``, unit vectors), with ``S = X Xᵀ``:

- descriptor augmentation: candidate ``i`` and its ``K`` most similar other candidates by ``S[i]`` (itself
  first, weight 1; the others weighted ``β · S[i, j]``) give ``x'ᵢ = Σ wⱼ xⱼ / Σ wⱼ`` and ``s'ᵢ = q · x'ᵢ``;
- max aggregation: ``e`` is the element-wise max of the ``K`` refined vectors ranked first by ``s'``; the final
  score of candidate ``i`` is ``(s'ᵢ + e · x'ᵢ) / 2``, by which the top-M is reordered.

Ties are broken by place in the global ranking wherever an order is taken (the neighbours of ``i`` among
equally similar candidates, the ``K`` first by ``s'``; the final order, by :func:`rrt_dist.rerank.core.rerank_top_k`,
breaks ties by global score then place). The authors' code takes the first ``K + 1`` refined vectors for ``e``;
the paper's equation, followed here, takes ``K``.
"""
from __future__ import annotations

import numpy as np
import torch

from .options import SuperGlobalOptions


def most_similar(similarity: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``similarity`` ``[..., N]``, the columns of its ``k`` largest values, ties by place (the lower
    column first), ordered by (value descending, place): a partition, not a sort of every row."""
    if k == 0:
        return np.zeros(similarity.shape[:-1] + (0,), np.int64)
    kth = -np.partition(-similarity, k - 1, axis=-1)[..., k - 1:k]          # the k-th largest value of each row
    above, tied = similarity > kth, similarity == kth
    chosen = above | (tied & (np.cumsum(tied, axis=-1) <= k - above.sum(axis=-1, keepdims=True)))
    columns = np.argsort(~chosen, axis=-1, kind="stable")[..., :k]           # the chosen, by place
    order = np.argsort(-np.take_along_axis(similarity, columns, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(columns, order, axis=-1)


def first_copies(vectors: np.ndarray) -> np.ndarray:
    """``[B, N]``: for each row's vector, the place of the first vector of its row equal to it (bit for bit). Matrix
    products round an element differently by where it falls in the blocks (sgemm's edge tiles), so identical
    candidates read every product through their first copy to tie exactly."""
    out = np.empty(vectors.shape[:2], np.int64)
    for b, row in enumerate(vectors):
        first: dict[bytes, int] = {}
        out[b] = [first.setdefault(v.tobytes(), i) for i, v in enumerate(row)]
    return out


def superglobal_scores(queries: np.ndarray, candidates: np.ndarray, valid: np.ndarray, k: int = 9,
                       beta: float = 0.15, device: str = "cpu") -> np.ndarray:
    """Final SuperGlobal scores ``[B, N]`` (float64; NaN where ``valid`` is False) of each query ``[B, d]`` against
    its candidates ``[B, N, d]``, a row's valid candidates being its top-M.

    Vectorised over the batch. The one ``O(M² d)`` step is ``S``; products are float32 on ``device`` (torch's
    batched products: the stored descriptors are fp16, the global search's products float32), sums float64. The refined vectors are never formed for all M:
    ``q · x'ᵢ`` and ``e · x'ᵢ`` are the same weighted means of ``q · xⱼ`` and ``e · xⱼ`` (linearity), summed in
    neighbour order (itself first) from products read through each vector's first copy, so identical candidates
    get identical scores: an exact tie, broken by place, never by rounding."""
    x = np.asarray(candidates, np.float32)
    if not valid.all():
        x = np.where(valid[..., None], x, np.float32(0))
    b, n, _ = x.shape
    rows = np.arange(b)[:, None]
    copy = first_copies(x)
    x_dev = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    sim = torch.bmm(x_dev, x_dev.transpose(1, 2)).cpu().numpy()
    sim = sim[rows[..., None], copy[:, :, None], copy[:, None, :]].astype(np.float64)
    others = np.where(valid[:, None, :] & ~np.eye(n, dtype=bool), sim, -np.inf)
    neighbours = most_similar(others, min(k, max(n - 1, 0)))                          # [B, N, k]
    weights = np.take_along_axis(others, neighbours, axis=-1)
    weights = np.where(np.isfinite(weights), beta * weights, 0.0)        # fewer than k others: weight 0
    total = 1.0 + weights.sum(axis=-1)

    def refined(products: np.ndarray) -> np.ndarray:
        """``v · x'ᵢ`` ``[B, N]`` from ``v · xⱼ`` ``[B, N]``: itself (weight 1), then its neighbours in order."""
        out = products.copy()
        for slot in range(neighbours.shape[-1]):
            out += weights[..., slot] * products[rows, neighbours[..., slot]]
        return out / total

    def products(v: np.ndarray) -> np.ndarray:
        """``v · xⱼ`` ``[B, N]`` (float32 products, as the global search's) for one vector ``v`` per row."""
        v_dev = torch.from_numpy(v.astype(np.float32)[..., None]).to(device)
        return torch.bmm(x_dev, v_dev)[..., 0].cpu().numpy()[rows, copy].astype(np.float64)

    s_refined = np.where(valid, refined(products(np.asarray(queries, np.float64))), np.nan)
    first = np.argsort(np.where(valid, -s_refined, np.inf), axis=-1, kind="stable")[:, :min(k, n)]   # [B, k]
    vectors = x[rows, first].astype(np.float64)                          # x' of the first k by s'
    for slot in range(neighbours.shape[-1]):
        vectors += weights[rows, first, slot, None] * x[rows, neighbours[rows, first, slot]]
    vectors /= total[rows, first][..., None]
    in_first = np.take_along_axis(valid, first, axis=-1)
    expanded = np.where(in_first[..., None], vectors, -np.inf).max(axis=1)       # e: their element-wise max
    expanded = np.where(np.isfinite(expanded), expanded, 0.0)             # a row with no valid candidate
    return (s_refined + refined(products(expanded))) / 2.0


class SuperGlobalScorer:
    """A set scorer (``score_sets``): a query's top-M candidates are scored together, from global descriptors
    only; :class:`rrt_dist.rerank.core.RerankCore` hands it a batch of queries at once."""
    name = "superglobal"

    def __init__(self, device: str = "auto", **cfg):
        self.cfg = SuperGlobalOptions(**cfg)
        # the similarity products on the GPU Ray gave the actor, if any
        self.device = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device

    def score_sets(self, queries: np.ndarray, candidates: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Scores ``[B, N]`` of each row's first ``m`` valid candidates (its top-M); NaN elsewhere (not
        reranked: they keep their global order below the top-M)."""
        top_m = valid & (np.cumsum(valid, axis=1) <= self.cfg.m)
        return superglobal_scores(queries, candidates, top_m, self.cfg.k, self.cfg.beta, self.device)
