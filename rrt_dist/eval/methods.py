"""The rows of an evaluation report: global-only, αQE, and reranking of either ranking's top-K."""
from __future__ import annotations

import numpy as np

from rrt_dist.datasets import Benchmark
from rrt_dist.datasets.base import NO_ID

from .runner import global_rankings, rerank_and_evaluate, settings_of

LABELS = {"global": "Global only", "aqe": "αQE", "gv": "GV", "rrt": "RRT", "aqe+rrt": "αQE + RRT"}


def evaluate_methods(bench: Benchmark, query_ids: np.ndarray, queries: np.ndarray, gallery_ids: np.ndarray,
                     gallery: np.ndarray, cfg, pools: dict, k_search: int | None = None,
                     examples: dict | None = None, searchers: dict | None = None) -> dict[str, dict]:
    """``{row label: {setting: metrics}}`` for ``cfg.methods``; ``pools[name]`` reranks (a RerankPool).

    ``examples`` receives, for the first setting, each row's ranking (the medium protocol's for
    reranked rows of revisitop benchmarks), for qualitative figures. ``searchers[setting]`` is the
    search function of that setting's index (exact in-process search when absent).
    """
    searchers = searchers or {}
    unknown = [m for m in cfg.methods if m not in LABELS]
    if unknown:
        raise ValueError(f"unknown reranker methods {unknown}; known: {', '.join(LABELS)}")
    row_query_ids = bench.queries.column("id").to_numpy().copy()
    row_query_ids[~np.isin(row_query_ids, query_ids)] = NO_ID        # no descriptor: nothing to rerank with
    rows: dict[str, dict] = {}
    for setting, with_d in settings_of(bench).items():
        search = searchers.get(setting)
        base = global_rankings(bench, query_ids, queries, gallery_ids, gallery, k_search, with_d, search=search)
        aqe = None
        if any(m.startswith("aqe") for m in cfg.methods):
            aqe = global_rankings(bench, query_ids, queries, gallery_ids, gallery, k_search, with_d,
                                  alpha_qe=(cfg.aqe_n, cfg.aqe_alpha), search=search)
        for method in cfg.methods:
            label = LABELS[method] + (f" (top-{cfg.k})" if method in ("gv", "rrt", "aqe+rrt") else "")
            ranked, scores = aqe if method.startswith("aqe") else base
            kept: dict = {}
            if method in ("global", "aqe"):
                metrics = bench.evaluate(ranked)
                kept["all"] = ranked
            else:
                pool = pools[method.split("+")[-1]]
                metrics = rerank_and_evaluate(bench, row_query_ids, ranked, scores, pool.rerank, cfg.k,
                                              cfg.protocol_junk_removal, keep=kept)
            rows.setdefault(label, {})[setting] = metrics
            if examples is not None and not with_d:
                examples[label] = kept.get("medium", kept.get("all"))
    return rows
