"""Reranking of a query's global top-K, the part without Ray: the reordering rule and the per-actor core that
takes candidates' descriptors from the feature tables and scores each (query, candidate) pair once."""
from __future__ import annotations

import os

import numpy as np

from rrt_dist.schema import NO_ID
from rrt_dist.store import FeatureStore, take_locals_from


def rerank_top_k(ids: np.ndarray, global_scores: np.ndarray, rerank_scores: np.ndarray, k: int,
                 global_weight: float = 0.0) -> np.ndarray:
    """Reorder the first ``k`` of a ranked list by rerank score + ``global_weight`` × global score, global score
    breaking ties; the rest keeps its order."""
    k = min(k, len(ids), len(rerank_scores))
    primary = np.asarray(rerank_scores[:k], np.float64)
    if global_weight:
        primary = primary + global_weight * np.asarray(global_scores[:k], np.float64)
    order = np.lexsort((-global_scores[:k], -primary))
    return np.concatenate([ids[:k][order], ids[k:]])


def _one(arrays: dict, i: int) -> dict:
    return {k: v[i] for k, v in arrays.items()}


def _open(table):
    """A table given as ``(uri, version)`` (what crosses to actors), or one already open / in memory."""
    return table if hasattr(table, "take_locals") else FeatureStore(*table)


class RerankCore:
    """Reranks with registry method ``scorer`` (see ``rrt_dist.rerank.methods``) over the query and gallery tables."""

    def __init__(self, scorer: str, scorer_cfg: dict, query_table, gallery_tables: list, threads: int | None = None):
        from .methods import get_reranker

        if threads:  # Ray caps intra-op threads at the actor's CPU reservation otherwise
            import torch

            torch.set_num_threads(threads)
        self.method = get_reranker(scorer)
        self.scorer = self.method.create(**scorer_cfg)
        # How much of the global score the final order adds to the scorer's (0: it only breaks ties).
        self.global_weight = float(getattr(self.scorer, "global_weight", 0.0))
        self.queries = None if query_table is None else _open(query_table)    # None: queries come as features
        self.galleries = [_open(t) for t in gallery_tables]
        self.cache: dict[tuple[int, int], float] = {}

    def rerank(self, query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        return self.rerank_with_scores(query_ids, ranked, scores, k)[0]

    def rerank_with_scores(self, query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray, k: int
                           ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rerank`, and the reranker's score of each of the first ``k`` entries of the reordered rows
        (``[n, k]``, NaN where there is no reranked entry)."""
        out = ranked.copy()
        rerank_scores = np.full((len(ranked), k), np.nan)
        valid_q = query_ids != NO_ID
        queries = self.queries.take_locals(query_ids[valid_q]) if valid_q.any() else None
        qi = 0
        for row in range(len(ranked)):
            if not valid_q[row]:
                continue
            query = _one(queries, qi)
            qi += 1
            head = ranked[row, :k]
            head = head[head != NO_ID]
            if len(head) == 0:
                continue
            qid = int(query_ids[row])
            missing = np.asarray([c for c in head.tolist() if (qid, c) not in self.cache], np.int64)
            if len(missing):
                new_scores = self.scorer(query, take_locals_from(self.galleries, missing))
                self.cache.update(zip(((qid, c) for c in missing.tolist()), new_scores.tolist()))
            head_scores = np.asarray([self.cache[(qid, c)] for c in head.tolist()])
            out[row, :len(head)] = rerank_top_k(head, scores[row, :len(head)], head_scores, len(head),
                                                self.global_weight)
            rerank_scores[row, :len(head)] = [self.cache[(qid, c)] for c in out[row, :len(head)].tolist()]
        return out, rerank_scores

    def rerank_query(self, query: dict, ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One query given by its features (``take_locals`` layout, one row; e.g. an uploaded image's) against its
        ranked ``ids``: the reordered ids and each reranked candidate's score, in that order (no cache: the
        query is in no table)."""
        head = ids[:k][ids[:k] != NO_ID]
        if len(head) == 0:
            return ids.copy(), np.zeros(0)
        head_scores = np.asarray(self.scorer(_one(query, 0), take_locals_from(self.galleries, head)), np.float64)
        order = rerank_top_k(head, scores[:len(head)], head_scores, len(head), self.global_weight)
        where = {int(c): s for c, s in zip(head.tolist(), head_scores.tolist())}
        return np.concatenate([order, ids[len(head):]]), np.asarray([where[int(c)] for c in order.tolist()])

    def explain(self, query_id: int, ids: np.ndarray) -> list[dict] | None:
        """Why the scorer scored candidates ``ids`` of query ``query_id`` as it did (its ``explain``: matches,
        weights), or None when it exposes nothing."""
        if not hasattr(self.scorer, "explain"):
            return None
        query = _one(self.queries.take_locals(np.asarray([query_id], np.int64)), 0)
        return self.scorer.explain(query, take_locals_from(self.galleries, np.asarray(ids, np.int64)))

    def pid(self) -> int:
        return os.getpid()
