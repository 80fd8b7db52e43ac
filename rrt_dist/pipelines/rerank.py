"""Rerank each query's global top-K in a pool of Ray actors (GPU when present).

Each actor opens the feature tables (pinned versions), takes the candidates' locals in one
batched read per query and scores them (each (query, candidate) pair once: scores are cached, as
the revisitop protocols and the ±distractor settings rerank mostly the same pairs); the top-K is reordered by (rerank score, global score)
and the rest keeps its global order. Actors are restarted by Ray if they die and their
unfinished calls are retried, so a run completes.
"""
from __future__ import annotations

import numpy as np
import ray

from rrt_dist.datasets.base import NO_ID
from rrt_dist.rerank.gv import rerank_top_k
from rrt_dist.rerank.scorers import create_scorer
from rrt_dist.store import FeatureStore, take_locals_from


def _one(arrays: dict, i: int) -> dict:
    return {k: v[i] for k, v in arrays.items()}


def _open(table):
    """A table given as ``(uri, version)`` (what crosses to actors), or one already open / in memory."""
    return table if hasattr(table, "take_locals") else FeatureStore(*table)


class RerankCore:
    def __init__(self, scorer: str, scorer_cfg: dict, query_table, gallery_tables: list, threads: int | None = None):
        if threads:  # Ray caps intra-op threads at the actor's CPU reservation otherwise
            import torch

            torch.set_num_threads(threads)
        self.scorer = create_scorer(scorer, **scorer_cfg)
        self.queries = _open(query_table)
        self.galleries = [_open(t) for t in gallery_tables]
        self.cache: dict[tuple[int, int], float] = {}

    def rerank(self, query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        out = ranked.copy()
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
            out[row, :len(head)] = rerank_top_k(head, scores[row, :len(head)], head_scores, len(head))
        return out

    def pid(self) -> int:
        import os

        return os.getpid()


class RerankPool:
    """``num_actors`` actors (0: in-process) sharing the work query-chunk by query-chunk."""

    def __init__(self, scorer: str, scorer_cfg: dict, query_store: FeatureStore, gallery_stores: list[FeatureStore],
                 num_actors: int = 1, use_gpu: bool | None = None, chunk: int = 8):
        args = (scorer, scorer_cfg, (query_store.uri, query_store.version),
                [(s.uri, s.version) for s in gallery_stores])
        self.chunk = chunk
        if num_actors == 0:
            self.local, self.actors = RerankCore(*args), []
        else:
            resources = ray.cluster_resources()
            use_gpu = resources.get("GPU", 0) >= 1 if use_gpu is None else use_gpu
            threads = max(1, int(resources.get("CPU", 1)) // num_actors)
            actor = ray.remote(RerankCore).options(max_restarts=-1, max_task_retries=-1, num_cpus=1,
                                                   num_gpus=1 if use_gpu else 0)
            self.local, self.actors = None, [actor.remote(*args, threads) for _ in range(num_actors)]

    def rerank(self, query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        if self.local is not None:
            return self.local.rerank(query_ids, ranked, scores, k)
        refs = []
        for n, s in enumerate(range(0, len(ranked), self.chunk)):
            e = s + self.chunk
            refs.append(self.actors[n % len(self.actors)].rerank.remote(query_ids[s:e], ranked[s:e], scores[s:e], k))
        return np.concatenate(ray.get(refs)) if refs else ranked.copy()

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)


def pools_for(cfg, stores: dict) -> dict[str, RerankPool]:
    """The reranker pools the configured ``methods`` need (GV, RRT), over the query and gallery tables."""
    from omegaconf import OmegaConf

    galleries = [stores[n] for n in ("gallery", "distractor") if n in stores]
    pools = {}
    if "gv" in cfg.methods:
        pools["gv"] = RerankPool("gv", OmegaConf.to_container(cfg.gv), stores["query"], galleries, cfg.num_actors)
    if any(m.endswith("rrt") for m in cfg.methods):
        if not cfg.checkpoint:
            raise ValueError("RRT rows need reranker.checkpoint=PATH (released or trained weights)")
        pools["rrt"] = RerankPool("rrt", {"checkpoint": cfg.checkpoint}, stores["query"], galleries, cfg.num_actors)
    return pools
