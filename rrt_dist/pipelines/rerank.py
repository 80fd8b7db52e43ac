"""Rerank each query's global top-K in a pool of Ray actors (each asking for ``ray.rerank``: GPU when given one).

Each actor holds a :class:`rrt_dist.rerank.core.RerankCore`: it opens the feature tables (pinned versions),
takes the candidates' descriptors in one batched read per query and scores them (each (query, candidate)
pair once: the revisitop protocols and the ±distractor settings rerank mostly the same pairs). Actors are
restarted by Ray if they die and their unfinished calls are retried, so a run completes.
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import ray

from rrt_dist.devices import require_gpu
from rrt_dist.rerank.core import RerankCore
from rrt_dist.rerank.methods import get_reranker
from rrt_dist.schema import StageResources
from rrt_dist.store import FeatureStore


ACTOR_RESTARTS = 2


class RerankActor(RerankCore):
    """A pool's actor: a :class:`RerankCore` that computes on the GPU Ray gave it, or stops naming ``ray.rerank``."""

    def __init__(self, *args):
        require_gpu("rerank")
        super().__init__(*args)


class RerankPool:
    """``num_actors`` actors (0: in-process) sharing the work query-chunk by query-chunk."""

    def __init__(self, scorer: str, scorer_cfg: dict, query_store: FeatureStore, gallery_stores: list[FeatureStore],
                 num_actors: int = 1, resources: StageResources | None = None, chunk: int = 8):
        args = (scorer, scorer_cfg, (query_store.uri, query_store.version),
                [(s.uri, s.version) for s in gallery_stores])
        self.chunk = chunk
        if num_actors == 0:
            self.local, self.actors = RerankCore(*args), []
        else:
            resources = resources or StageResources()
            # a lost actor (node gone, out of memory) is restarted and its chunk retried a few times; one that
            # fails the same way each time (its constructor raising) ends the job with its own error, not forever
            actor = ray.remote(RerankActor).options(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
                                                   **resources.actor_options(num_actors))
            self.local, self.actors = None, [actor.remote(*args, resources.threads) for _ in range(num_actors)]

    def rerank(self, query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        return self.rerank_with_scores(query_ids, ranked, scores, k)[0]

    def rerank_with_scores(self, query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray, k: int
                           ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rerank` and the reranker's scores of the reordered top ``k`` (RerankCore.rerank_with_scores)."""
        if self.local is not None:
            return self.local.rerank_with_scores(query_ids, ranked, scores, k)
        parts = ray.get([self.actors[n % len(self.actors)].rerank_with_scores.remote(
            query_ids[s:s + self.chunk], ranked[s:s + self.chunk], scores[s:s + self.chunk], k)
            for n, s in enumerate(range(0, len(ranked), self.chunk))])
        if not parts:
            return ranked.copy(), np.full((len(ranked), k), np.nan)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def cost(self) -> tuple[float, int]:
        """``(seconds, candidates)`` its actors spent reading candidates and scoring them so far
        (:meth:`RerankCore.cost`, summed over the actors; the Ray calls around them not included)."""
        parts = [self.local.cost()] if self.local is not None else ray.get([a.cost.remote() for a in self.actors])
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)


def scorer_options(cfg, name: str) -> dict:
    """The options of reranker ``name`` from a ``reranker`` config: ``reranker.<name>`` (RRT: and its checkpoint,
    and ``global_weight=null`` resolved to the one the checkpoint records, so that the report can say it)."""
    from omegaconf import OmegaConf

    from rrt_dist.models.rrt import recorded_global_weight

    known = {f.name for f in fields(get_reranker(name).options)} if get_reranker(name).options else set()
    options = {k: v for k, v in (OmegaConf.to_container(cfg[name], resolve=True) if name in cfg else {}).items()
               if k in known}                                   # keys the config only refuses (renamed) stay out
    if name == "rrt":
        if not cfg.checkpoint:
            raise ValueError("RRT rows need reranker.checkpoint=PATH (released or trained weights)")
        options["checkpoint"] = cfg.checkpoint
        if "global_weight" in options and options["global_weight"] is None:     # the training run's choice
            options["global_weight"] = recorded_global_weight(cfg.checkpoint)
    return options


def open_pool(cfg, name: str, stores: dict, patch_stores: dict | None = None,
              resources: StageResources | None = None) -> RerankPool:
    """The pool of reranker ``name`` over the query and gallery tables: ``stores``, or ``patch_stores`` when it
    reads patch grids; each of its ``cfg.num_actors`` actors asks for ``resources`` (``ray.rerank``)."""
    entry = get_reranker(name)
    tables = patch_stores if patch_stores and "patches" in entry.inputs else stores
    galleries = [tables[n] for n in ("gallery", "distractor") if n in tables]
    return RerankPool(name, scorer_options(cfg, name), tables["query"], galleries, cfg.num_actors, resources)
