"""The rows of an evaluation report: global-only, αQE, and reranking of either ranking's top-K."""
from __future__ import annotations

import time

import numpy as np

from rrt_dist.datasets import Benchmark
from rrt_dist.rerank.methods import parse_method
from rrt_dist.schema import NO_ID

from .runner import metric_rankings, rerank_and_evaluate, searched_tables, settings_of


def reranked_depth(bench: Benchmark, galleries: dict, k: int, k_search: int | None) -> int:
    """How many candidates per query a top-``k`` reranking really reorders: at most the candidates there are
    (the largest setting's searchable gallery, the query itself excluded in leave-one-out mode)."""
    largest = sum(len(t) for t in searched_tables(galleries, bool(bench.n_distractors)))
    if k_search:
        largest = min(largest, k_search)
    return max(1, min(k, largest - int(bench.exclude_self)))


def headline(metrics: dict) -> float:
    """The one number a row is judged by: revisitop Medium mAP, else mAP, MAP@R, R@1 or the first metric."""
    if "medium" in metrics:
        return metrics["medium"]["mAP"]
    for key in ("mAP", "MAP@R", "R@1"):
        if key in metrics:
            return metrics[key]
    return next(iter(metrics.values()))


def evaluate_methods(bench: Benchmark, query_ids: np.ndarray, queries: np.ndarray, galleries: dict,
                     cfg, open_pool, k_search: int | None = None,
                     examples: dict | None = None, searchers: dict | None = None,
                     exact_device: str | None = None, per_query: dict | None = None,
                     costs: dict | None = None) -> dict[str, dict]:
    """``{row label: {setting: metrics}}`` for ``cfg.methods``, in their order.

    Rows are computed reranker by reranker: ``open_pool(name)`` starts that reranker's pool (a RerankPool),
    which serves its rows in every setting (its cache of scored pairs carries over: the ±distractor settings
    rerank mostly the same pairs) and is closed before the next one starts, so the pools never hold more
    than one reranker's resources (three pools of one CPU each would never all start on two CPUs). The
    global rankings are recomputed per reranker: a search is cheap next to reranking.

    ``examples[setting][row]`` receives each row's top ``depth`` (the medium protocol's for reranked rows of
    revisitop benchmarks), for figures and the results browser; ``per_query[setting][row]`` each query's AP per
    protocol (``Benchmark.evaluate``). ``searchers[setting]`` is the search function of that setting's index
    (exact search streamed from the tables when absent), which scores its blocks on ``exact_device``.
    ``costs[row]`` receives the seconds a query costs in the row's own stage: a reranked row's reranking of one
    query's top-k (its reranker's time reading and scoring candidates per candidate scored, times the candidates it
    reorders), αQE's expanded second search (per query, mean over the settings); none for global-only rows.
    """
    searchers = searchers or {}
    methods = [parse_method(m) for m in cfg.methods]          # validated at start-up; parsing refuses unknown ones
    depth = reranked_depth(bench, galleries, cfg.depth, k_search)
    row_query_ids = bench.queries.column("id").to_numpy().copy()
    row_query_ids[~np.isin(row_query_ids, query_ids)] = NO_ID        # no descriptor: nothing to rerank with
    reordered = {m.name: m.reranker.reranked_depth(depth, cfg[m.reranker.name] if m.reranker.options else {})
                 for m in methods if m.reranker}            # SuperGlobal: its top-M, at most the depth
    labels = {m.name: m.label + (f" (top-{reordered[m.name]})" if m.reranker else "") for m in methods}
    stage_s: dict = {labels[m.name]: None for m in methods}
    rows: dict[str, dict] = {labels[m.name]: {} for m in methods}
    kept_examples: dict = {setting: {} for setting in settings_of(bench)}
    query_aps: dict = {setting: {} for setting in settings_of(bench)}
    expansion_s: list[float] = []
    for reranker in dict.fromkeys(m.reranker for m in methods):
        group = [m for m in methods if m.reranker == reranker]
        pool = open_pool(reranker.name) if reranker else None
        try:
            for setting, with_d in settings_of(bench).items():
                search = searchers.get(setting)
                base = metric_rankings(bench, query_ids, queries, galleries, k_search, with_d, search=search,
                                       depth=cfg.depth, device=exact_device)
                aqe = None
                if any(m.expand for m in group):
                    start = time.perf_counter()
                    aqe = metric_rankings(bench, query_ids, queries, galleries, k_search, with_d,
                                          alpha_qe=(cfg.aqe.n, cfg.aqe.alpha), search=search, depth=cfg.depth,
                                          device=exact_device)
                    expansion_s.append((time.perf_counter() - start) / max(len(query_ids), 1))
                for method in group:
                    ranked, scores, positions = aqe if method.expand else base
                    kept: dict = {}
                    aps: dict = {}
                    if pool is None:
                        metrics = bench.evaluate(ranked, positions, aps)
                        kept["all"] = ranked[:, :depth]
                    else:
                        metrics = rerank_and_evaluate(bench, row_query_ids, ranked, scores, pool.rerank, cfg.depth,
                                                      cfg.protocol_junk_removal, keep=kept, positions=positions,
                                                      per_query=aps)
                    rows[labels[method.name]][setting] = metrics
                    kept_examples[setting][labels[method.name]] = kept.get("medium", kept.get("all"))
                    query_aps[setting][labels[method.name]] = aps
            if pool is not None:
                seconds, scored = pool.cost()
                for method in group:
                    stage_s[labels[method.name]] = seconds / scored * reordered[method.name] if scored else None
        finally:
            if pool is not None:
                pool.close()
    if examples is not None:
        examples.update({s: {label: kept[label] for label in rows} for s, kept in kept_examples.items()})
    if per_query is not None:
        per_query.update({s: {label: aps[label] for label in rows} for s, aps in query_aps.items()})
    if costs is not None:
        for m in methods:
            if m.expand and not m.reranker:
                stage_s[labels[m.name]] = float(np.mean(expansion_s))
        costs.update({labels[m.name]: {"method": m.name, "stage_s_per_query": stage_s[labels[m.name]]}
                      for m in methods})
    return rows
