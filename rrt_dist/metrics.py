"""Retrieval metrics, exactly as the benchmarks define them (pure numpy).

All values are fractions in [0, 1]; reports multiply by 100.

- ``revisitop``: Revisited Oxford/Paris (Radenović et al., CVPR 2018). Trapezoidal AP over the
  ranking with the protocol's junk images removed; mP@k uses the revisitop definition, which
  evaluates precision at ``min(k, rank of the last retrieved positive)``.
- ``gldv2_map_at_k``: Google Landmarks v2 retrieval (Kaggle) mAP@100.
- ``recall_at_n``: place recognition (MSLS, Pitts): a query is a hit at N when any positive is in
  its top N.
- ``metric_learning``: SOP / CUB200 / Cars196 R@K, P@1, R-Precision and MAP@R (Musgrave et al.).
"""
from __future__ import annotations

# A layer below both the benchmark readers (which carry each protocol with its ground truth) and the evaluation;
# ``rrt_dist.eval.metrics`` re-exports it as the stable public path.
__all__ = ["REVISITOP_PROTOCOLS", "positive_positions", "average_precision", "revisitop", "gldv2_map_at_k",
           "recall_at_n", "metric_learning_from_ranks", "precision_at_r", "topk_stable", "metric_learning"]

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# Which ground-truth lists count as positive and as junk in each revisitop protocol.
REVISITOP_PROTOCOLS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def positive_positions(ranked: np.ndarray, positives: Iterable[int], junk: Iterable[int] = (),
                       at: np.ndarray | None = None) -> np.ndarray:
    """0-based positions of ``positives`` in ``ranked`` once every ``junk`` entry is removed.

    ``at``: where each entry of ``ranked`` stands in the whole ranking (ascending), for a summary of it that keeps
    only some entries (its top and every positive and junk entry, :func:`rrt_dist.index.exact.rank_relevant_blocks`);
    default: ``ranked`` is the ranking itself."""
    ranked = np.asarray(ranked)
    junk = np.fromiter(junk, dtype=np.int64)
    positives = np.fromiter(positives, dtype=np.int64)
    if at is None:
        return np.flatnonzero(np.isin(ranked[~np.isin(ranked, junk)], positives))
    at = np.asarray(at)
    hits = at[np.isin(ranked, positives)]
    return hits - np.searchsorted(at[np.isin(ranked, junk)], hits)


def average_precision(positions: np.ndarray, n_positives: int) -> float:
    """Trapezoidal AP from the 0-based positions of the retrieved positives (sorted).

    Positives missing from a truncated ranking contribute nothing; ``n_positives`` counts them.
    """
    if n_positives == 0:
        raise ValueError("average precision is undefined without positives")
    positions = np.asarray(positions, dtype=np.float64)
    found = np.arange(len(positions), dtype=np.float64)
    # Precision just before (j / r, taken as 1 at rank 0) and at (j + 1) / (r + 1) the j-th hit.
    before = np.divide(found, positions, out=np.ones_like(found), where=positions > 0)
    at = (found + 1.0) / (positions + 1.0)
    return float(np.sum((before + at) / 2.0) / n_positives)


def revisitop(ranks: np.ndarray, gnd: Sequence[Mapping[str, Iterable[int]]], kappas: Sequence[int] = (1, 5, 10),
              positions: np.ndarray | None = None, per_query: dict | None = None) -> dict:
    """Revisited Oxford/Paris evaluation.

    ``ranks``: int array ``[n_queries, n_ranked]`` of gallery indices, best first; it may be
    truncated, and indices not named in ``gnd`` (e.g. R1M distractors appended after the
    gallery) are plain negatives. ``gnd[q]`` holds ``easy``, ``hard`` and ``junk`` index lists.
    ``positions`` (same shape): each entry's place in the whole ranking, when ``ranks`` summarises it
    (its top and every relevant entry): the same values as on the whole ranking (see :func:`positive_positions`).

    Returns ``{"easy"|"medium"|"hard": {"mAP": float, "mP@k": {k: float}}}``. Queries without
    positives under a protocol are left out of its averages (NaN when none is left). ``per_query`` receives each
    protocol's AP per query (NaN where it has no positives).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != len(gnd):
        raise ValueError(f"ranks must be [n_queries={len(gnd)}, n_ranked], got shape {ranks.shape}")
    kappas = tuple(int(k) for k in kappas)
    out = {}
    for protocol, (pos_keys, junk_keys) in REVISITOP_PROTOCOLS.items():
        aps, precisions = [], []
        query_aps = np.full(len(gnd), np.nan)
        for q, (ranked, g) in enumerate(zip(ranks, gnd)):
            positives = np.unique(np.concatenate([np.asarray(g.get(k, []), dtype=np.int64) for k in pos_keys]))
            if len(positives) == 0:
                continue
            junk = np.concatenate([np.asarray(g.get(k, []), dtype=np.int64) for k in junk_keys])
            pos = positive_positions(ranked, positives, junk, None if positions is None else positions[q])
            query_aps[q] = average_precision(pos, len(positives))
            aps.append(query_aps[q])
            precisions.append(_revisitop_precisions(pos, kappas))
        if per_query is not None:
            per_query[protocol] = query_aps
        out[protocol] = {
            "mAP": float(np.mean(aps)) if aps else float("nan"),
            "mP@k": {k: (float(np.mean([p[i] for p in precisions])) if precisions else float("nan")) for i, k in enumerate(kappas)},
        }
    return out


def _revisitop_precisions(positions: np.ndarray, kappas: Sequence[int]) -> list[float]:
    """Revisitop mP@k for one query: precision at min(k, 1-based rank of the last positive found)."""
    if len(positions) == 0:
        return [0.0] * len(kappas)
    one_based = positions + 1
    last = int(one_based.max())
    return [float(np.sum(one_based <= min(last, k)) / min(last, k)) for k in kappas]


def gldv2_map_at_k(predictions: Mapping, solution: Mapping, k: int = 100) -> float:
    """GLDv2 retrieval mAP@k (Kaggle definition).

    ``solution``: query id -> set of relevant index ids, for every scored query (the caller
    selects Public or Private). ``predictions``: query id -> ranked index ids. A query with no
    prediction scores 0; a repeated prediction is skipped but still takes its rank position;
    AP is normalised by ``min(#relevant, k)``. A prediction for a query not in ``solution``
    is an error (it usually means the wrong split or id mapping).
    """
    unknown = [q for q in predictions if q not in solution]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted queries are not in the solution, e.g. {unknown[:3]}")
    if not solution:
        raise ValueError("empty solution: no query to score")
    total = 0.0
    for query, relevant in solution.items():
        relevant = set(relevant)
        if not relevant:
            raise ValueError(f"query {query!r} has no relevant images; drop Ignored queries before scoring")
        seen, hits, ap = set(), 0, 0.0
        for rank, item in enumerate(list(predictions.get(query, ()))[:k], start=1):
            if item in seen:
                continue
            seen.add(item)
            if item in relevant:
                hits += 1
                ap += hits / rank
        total += ap / min(len(relevant), k)
    return total / len(solution)


def recall_at_n(ranks: np.ndarray, positives: Sequence[Iterable[int]], ns: Sequence[int] = (1, 5, 10, 20)) -> dict:
    """Place-recognition recall@N: fraction of queries with at least one positive in the top N.

    Queries without any positive (e.g. no database image within 25 m) are left out, as in the
    MSLS and Pittsburgh evaluations. Returns ``{n: float}``.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != len(positives):
        raise ValueError(f"ranks must be [n_queries={len(positives)}, n_ranked], got shape {ranks.shape}")
    first_hit = []
    for ranked, pos in zip(ranks, positives):
        pos = np.fromiter(pos, dtype=np.int64)
        if len(pos) == 0:
            continue
        hits = np.flatnonzero(np.isin(ranked, pos))
        first_hit.append(hits[0] if len(hits) else np.inf)
    if not first_hit:
        raise ValueError("no query has a positive")
    first_hit = np.asarray(first_hit)
    return {int(n): float(np.mean(first_hit < n)) for n in ns}


def metric_learning_from_ranks(ranks: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                               n_relevant: np.ndarray, recall_ks: Sequence[int] = (1, 10, 100),
                               r_includes_query: bool = False) -> dict:
    """R@k, P@1, RP and MAP@R from rankings that already exclude each query itself.

    ``n_relevant[q]`` is R, the number of same-label gallery images other than the query.
    ``r_includes_query``: the ViT-reranking / DIML reference's convention, R counts the query itself
    (one more than it can retrieve), so its RP and MAP@R are lower than the standard ones.
    ``ranks`` must reach depth ``max(max(recall_ks), max(R))`` for exact values.
    """
    ranks = np.asarray(ranks)
    n_relevant = np.asarray(n_relevant)
    # negative entries pad short rankings and never count as relevant
    relevant = (np.asarray(gallery_labels)[ranks] == np.asarray(query_labels)[:, None]) & (ranks >= 0)
    depth = ranks.shape[1]
    need = max(max(recall_ks), int(n_relevant.max(initial=0)) + int(r_includes_query))
    if depth < min(need, len(gallery_labels) - 1):
        raise ValueError(f"rankings of depth {depth} are too short; exact metrics need {need}")
    out = {f"R@{k}": float(np.mean(relevant[:, :k].any(axis=1))) for k in recall_ks}
    has = n_relevant > 0
    if not has.any():
        raise ValueError("no query has another image of its label")
    rel, r = relevant[has], n_relevant[has] + int(r_includes_query)
    out["P@1"] = float(np.mean(rel[:, 0]))
    within_r = np.arange(depth)[None, :] < r[:, None]
    out["RP"] = float(np.mean((rel & within_r).sum(axis=1) / r))
    precision_at_i = np.cumsum(rel, axis=1) / np.arange(1, depth + 1)[None, :]
    out["MAP@R"] = float(np.mean((precision_at_i * (rel & within_r)).sum(axis=1) / r))
    return out


def precision_at_r(ranks: np.ndarray, positives: Sequence[Iterable[int]]) -> dict:
    """P@1, R-Precision and MAP@R with R = the number of positives of each query (queries without
    positives left out); ``ranks`` holds gallery indices best first, negative entries are padding."""
    p1, rp, map_r = [], [], []
    for ranked, pos in zip(np.asarray(ranks), positives):
        pos = np.fromiter(pos, dtype=np.int64)
        if len(pos) == 0:
            continue
        r = len(pos)
        relevant = np.isin(ranked[:r], pos) & (ranked[:r] >= 0)
        relevant = np.pad(relevant, (0, r - len(relevant)))        # a ranking shorter than R misses the rest
        p1.append(float(np.isin(ranked[:1], pos).any()))
        rp.append(relevant.sum() / r)
        map_r.append(float(np.sum(np.cumsum(relevant) / np.arange(1, r + 1) * relevant) / r))
    if not p1:
        raise ValueError("no query has a positive")
    return {"P@1": float(np.mean(p1)), "RP": float(np.mean(rp)), "MAP@R": float(np.mean(map_r))}


def topk_stable(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first; ties go to the lower index."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    # The k-th value decides the boundary; everything strictly better is in, ties fill by index.
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for row in range(scores.shape[0]):
        s = scores[row]
        better = np.flatnonzero(s > kth[row])
        tied = np.flatnonzero(s == kth[row])[: k - len(better)]
        cand = np.concatenate([better, tied])
        out[row] = cand[np.lexsort((cand, -s[cand]))]
    return out


def metric_learning(embeddings: np.ndarray, labels: np.ndarray, recall_ks: Sequence[int] = (1, 10, 100),
                    chunk: int = 1024) -> dict:
    """Metric-learning evaluation: query set = gallery set, self excluded, cosine ranking.

    ``R@k`` is over all queries (a query with no other same-label image is a miss); ``P@1``,
    ``RP`` and ``MAP@R`` are over queries with at least one other same-label image. Ties in
    similarity keep gallery order (stable sort).
    """
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_relevant = counts[inverse] - 1
    depth = min(len(x) - 1, max(max(recall_ks), int(n_relevant.max(initial=0))))
    ranks = np.empty((len(x), depth), dtype=np.int64)
    for start in range(0, len(x), chunk):
        sim = x[start:start + chunk] @ x.T
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf
        ranks[start:start + chunk] = topk_stable(sim, depth)
    return metric_learning_from_ranks(ranks, labels, labels, n_relevant, recall_ks)
