"""Rank a benchmark's queries against its gallery, with and without distractors, and score them."""
from __future__ import annotations

import numpy as np

from rrt_dist.datasets import Benchmark
from rrt_dist.index.exact import exact_search


def human_count(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 10**6 else f"{n / 1e3:g}k" if n >= 1000 else str(n)


def settings_of(bench: Benchmark) -> dict[str, bool]:
    """Setting name -> whether distractors are searched (the paper's ±R1M columns)."""
    out = {bench.name: False}
    if bench.n_distractors:
        out[f"{bench.name}+{human_count(bench.n_distractors)}"] = True
    return out


def global_rankings(bench: Benchmark, query_ids: np.ndarray, queries: np.ndarray, gallery_ids: np.ndarray,
                    gallery: np.ndarray, k: int | None, with_distractors: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ranked gallery ids and scores ``[n_queries, k]`` in the benchmark's query order.

    Queries without a descriptor (unreadable images) get rows of -1.
    """
    splits = np.asarray(bench.gallery.column("split").to_pylist())
    searchable = bench.gallery.column("id").to_numpy()[with_distractors | (splits != "distractor")]
    keep = np.isin(gallery_ids, searchable)
    ids, scores = exact_search(gallery[keep], gallery_ids[keep], queries, k)
    order = bench.queries.column("id").to_numpy()
    out_ids = np.full((len(order), ids.shape[1]), -1, dtype=np.int64)
    out_scores = np.full((len(order), ids.shape[1]), -np.inf, dtype=np.float32)
    row = {q: i for i, q in enumerate(order)}
    rows = np.asarray([row[q] for q in query_ids], dtype=np.int64)
    out_ids[rows], out_scores[rows] = ids, scores
    return out_ids, out_scores


def evaluate_global_only(bench: Benchmark, query_ids, queries, gallery_ids, gallery, k: int | None = None) -> dict:
    """Metrics per setting for global-only retrieval."""
    return {name: bench.evaluate(global_rankings(bench, query_ids, queries, gallery_ids, gallery, k, with_d)[0])
            for name, with_d in settings_of(bench).items()}
