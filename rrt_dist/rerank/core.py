"""Reranking of a query's global top-K, the part without Ray: the reordering rule and the per-actor core that
takes candidates' descriptors from the feature tables and scores them: a pair scorer each (query, candidate) pair
once, a set scorer (SuperGlobal) each query's candidates together, a batch of queries per call."""
from __future__ import annotations

import os
import time

import numpy as np

from rrt_dist.schema import NO_ID
from rrt_dist.store import FeatureStore, take_globals_from, take_locals_from


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


def _head(row: np.ndarray, k: int) -> np.ndarray:
    """The candidates a row hands its reranker: its first ``k`` ids, the padding past the gallery left out."""
    return row[:k][row[:k] != NO_ID]


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
        self.cache: dict[tuple[int, int], float] = {}          # a pair scorer's scores by (query, candidate)
        # a set scorer (``score_sets``) scores a query's candidates together, from their global descriptors
        self.scores_sets = hasattr(self.scorer, "score_sets")
        self.spent, self.scored = 0.0, 0     # seconds reading candidates and scoring them; candidates scored

    def rerank(self, query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        return self.rerank_with_scores(query_ids, ranked, scores, k)[0]

    def rerank_with_scores(self, query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray, k: int
                           ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rerank`, and the reranker's score of each of the first ``k`` entries of the reordered rows
        (``[n, k]``, NaN where there is no reranked entry). A set scorer scores all the rows in one call."""
        out = ranked.copy()
        rerank_scores = np.full((len(ranked), k), np.nan)
        rows = [r for r in range(len(ranked)) if query_ids[r] != NO_ID and len(_head(ranked[r], k))]
        if not rows:
            return out, rerank_scores
        query_ids, heads = query_ids[rows], [_head(ranked[r], k) for r in rows]
        if self.scores_sets:
            head_scores = self._set_scores(self.queries.take_globals(query_ids), heads)
        else:
            queries = self.queries.take_locals(query_ids)
            head_scores = [self._pair_scores(int(qid), _one(queries, i), head)
                           for i, (qid, head) in enumerate(zip(query_ids, heads))]
        for r, head, head_score in zip(rows, heads, head_scores):
            out[r, :len(head)], ordered = self._reorder(head, scores[r, :len(head)], head_score)
            rerank_scores[r, :len(ordered)] = ordered
        return out, rerank_scores

    def rerank_query(self, query: dict, ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One query given by its features (``take_locals`` layout, one row; e.g. an uploaded image's) against its
        ranked ``ids``: the reordered ids and each reranked candidate's score, in that order (no cache: the
        query is in no table)."""
        return self.rerank_queries([query], [ids], [scores], k)[0]

    def rerank_queries(self, queries: list[dict], ids: list[np.ndarray], scores: list[np.ndarray], k: int
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`rerank_query` for a batch of requests: ``queries[i]`` (one row each) against its ranked ``ids[i]``
        (lengths may differ), the candidates of all read in one take. Scored in one call where the scorer allows
        it: a set scorer (SuperGlobal) vectorised over the queries, a scorer with ``score_pairs`` (RRT) all pairs of
        all queries in one run of forward passes; any other (GV, structural) query by query."""
        heads = [_head(row, k) for row in ids]
        live = [i for i, head in enumerate(heads) if len(head)]
        out = [(np.asarray(row).copy(), np.zeros(0)) for row in ids]
        if not live:
            return out
        if self.scores_sets:
            scored = self._set_scores(np.stack([queries[i]["global"][0] for i in live]), [heads[i] for i in live])
        else:
            start, sizes = time.perf_counter(), [len(heads[i]) for i in live]
            cands = take_locals_from(self.galleries, np.concatenate([heads[i] for i in live]))
            if hasattr(self.scorer, "score_pairs"):
                owner = np.repeat(np.arange(len(live)), sizes)
                flat = self.scorer.score_pairs([_one(queries[i], 0) for i in live], owner, cands)
            else:
                flat = np.concatenate([self.scorer(_one(queries[i], 0), {key: v[s:e] for key, v in cands.items()})
                                       for i, s, e in zip(live, np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes))])
            self._count(start, len(flat))
            scored = np.split(np.asarray(flat, np.float64), np.cumsum(sizes)[:-1])
        for i, head_score in zip(live, scored):
            order, ordered = self._reorder(heads[i], scores[i][:len(heads[i])], head_score)
            out[i] = (np.concatenate([order, ids[i][len(order):]]), ordered)
        return out

    def _pair_scores(self, query_id: int, query: dict, head: np.ndarray) -> np.ndarray:
        """A pair scorer's scores of ``head``, each (query, candidate) pair scored once across calls."""
        missing = np.asarray([c for c in head.tolist() if (query_id, c) not in self.cache], np.int64)
        if len(missing):
            start = time.perf_counter()
            new_scores = self.scorer(query, take_locals_from(self.galleries, missing))
            self._count(start, len(missing))
            self.cache.update(zip(((query_id, c) for c in missing.tolist()), np.asarray(new_scores).tolist()))
        return np.asarray([self.cache[(query_id, c)] for c in head.tolist()], np.float64)

    def _set_scores(self, query_globals: np.ndarray, heads: list[np.ndarray]) -> list[np.ndarray]:
        """A set scorer's scores of each query's ``heads[i]`` (NaN past what it reorders), all queries in one call:
        the candidates' global descriptors taken from the gallery tables in one read."""
        start = time.perf_counter()
        valid = np.arange(max(len(h) for h in heads))[None, :] < np.asarray([len(h) for h in heads])[:, None]
        candidates = np.zeros(valid.shape + (query_globals.shape[1],), np.float32)
        candidates[valid] = take_globals_from(self.galleries, np.concatenate(heads))
        scored = self.scorer.score_sets(query_globals, candidates, valid)
        self._count(start, int(np.sum(~np.isnan(scored))))
        return [scored[i, :len(h)] for i, h in enumerate(heads)]

    def _count(self, start: float, candidates: int) -> None:
        self.spent += time.perf_counter() - start
        self.scored += candidates

    def cost(self) -> tuple[float, int]:
        """``(seconds, candidates)``: the time spent reading candidates' descriptors and scoring them, and how many
        it scored (a pair scorer's cached pairs count once): a top-k costs about ``k × seconds / candidates``."""
        return self.spent, self.scored

    def _reorder(self, head: np.ndarray, global_scores: np.ndarray, head_scores: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``head`` with its scored prefix (scores not NaN: a set scorer's top-M) reordered by
        :func:`rerank_top_k`, the rest in its order; and the prefix's scores in the new order."""
        n = int(np.argmax(np.isnan(head_scores))) if np.isnan(head_scores).any() else len(head)
        order = rerank_top_k(head[:n], global_scores[:n], head_scores[:n], n, self.global_weight)
        where = dict(zip(head[:n].tolist(), head_scores[:n].tolist()))
        return np.concatenate([order, head[n:]]), np.asarray([where[c] for c in order.tolist()], np.float64)

    def explain(self, query_id: int, ids: np.ndarray) -> list[dict] | None:
        """Why the scorer scored candidates ``ids`` of query ``query_id`` as it did (its ``explain``: matches,
        weights), or None when it exposes nothing."""
        if not hasattr(self.scorer, "explain"):
            return None
        query = _one(self.queries.take_locals(np.asarray([query_id], np.int64)), 0)
        return self.scorer.explain(query, take_locals_from(self.galleries, np.asarray(ids, np.int64)))

    def pid(self) -> int:
        return os.getpid()
