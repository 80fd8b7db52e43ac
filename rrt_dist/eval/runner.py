"""Rank a benchmark's queries against its gallery, with and without distractors, and score them."""
from __future__ import annotations

import numpy as np

from rrt_dist.datasets import Benchmark
from rrt_dist.metrics import REVISITOP_PROTOCOLS
from rrt_dist.index.exact import PAST_END, rank_relevant_blocks, streaming_searcher, table_blocks
from rrt_dist.index.qe import expanded_queries
from rrt_dist.schema import NO_ID
from rrt_dist.store import take_globals_from


def human_count(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 10**6 else f"{n / 1e3:g}k" if n >= 1000 else str(n)


def settings_of(bench: Benchmark) -> dict[str, bool]:
    """Setting name -> whether distractors are searched (the paper's ±R1M columns)."""
    out = {bench.name: False}
    if bench.n_distractors:
        out[f"{bench.name}+{human_count(bench.n_distractors)}"] = True
    return out


def searched_tables(galleries: dict, with_distractors: bool) -> list:
    """The tables a setting searches: the gallery's, and the distractors' when ``with_distractors``."""
    return [galleries["gallery"]] + ([galleries["distractor"]] if with_distractors and "distractor" in galleries
                                     else [])


def global_rankings(bench: Benchmark, query_ids: np.ndarray, queries: np.ndarray, galleries: dict,
                    k: int | None, with_distractors: bool, alpha_qe: tuple[int, float] | None = None,
                    search=None) -> tuple[np.ndarray, np.ndarray]:
    """Ranked gallery ids and scores ``[n_queries, k]`` in the benchmark's query order.

    ``galleries`` holds the feature tables (``gallery``, optionally ``distractor``). ``search(queries, k) ->
    (scores, ids)`` is the index to use (e.g. a ShardedIndex over this setting's tables); by default exact
    search streamed block by block from the tables (the driver never holds the gallery), which with ``k=None``
    ranks the whole gallery. ``alpha_qe=(n, alpha)`` expands each query with its top-n first (their vectors read
    by id). Queries without a descriptor get rows of -1.
    """
    ids, scores, _ = metric_rankings(bench, query_ids, queries, galleries, k, with_distractors, alpha_qe, search)
    return ids, scores


def metric_rankings(bench: Benchmark, query_ids: np.ndarray, queries: np.ndarray, galleries: dict,
                    k: int | None, with_distractors: bool, alpha_qe: tuple[int, float] | None = None,
                    search=None, depth: int | None = None, device: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`global_rankings`, and the positions that go with a summarised whole ranking.

    With ``depth`` (entries read from the top: the reranked top-k), exact search (``search=None``, ``k=None``)
    and a protocol that scores only its relevant ids' places (revisitop: positives and junk), the whole ranking
    is summarised per query: its first ``depth`` + (relevant ids) entries, which hold the first ``depth`` entries
    left after any protocol's junk is removed, and each relevant id where it ranks. Its metric equals the whole
    ranking's (:func:`rrt_dist.eval.metrics.positive_positions`) at O(depth) memory per query instead of
    O(gallery): 70 queries over R1M hold kilobytes, not 560 MB. Returns ``(ids, scores, positions)``;
    ``positions`` is None when the rows are the ranking itself. ``device``: where that summary scores the blocks.
    """
    tables = searched_tables(galleries, with_distractors)
    relevant = bench.relevant_ids() if depth is not None and k is None and search is None else None
    if search is None:
        search = streaming_searcher(tables)
    if alpha_qe:
        queries = expanded_queries(search, lambda ids: take_globals_from(tables, ids), queries, *alpha_qe)
    order = bench.queries.column("id").to_numpy()
    row = {q: i for i, q in enumerate(order)}
    rows = np.asarray([row[q] for q in query_ids], dtype=np.int64)
    positions = None
    if relevant is not None:
        wanted = [relevant[r] for r in rows]
        top = depth + max((len(w) for w in wanted), default=0)
        ids, scores, positions = rank_relevant_blocks(lambda: table_blocks(tables), queries, wanted, top, device)
    else:
        scores, ids = search(queries, k)
    if np.array_equal(order, query_ids):           # the usual case: no [n_queries, N] copy
        return ids, scores, positions
    out_ids = np.full((len(order), ids.shape[1]), NO_ID, dtype=ids.dtype)
    out_scores = np.full((len(order), ids.shape[1]), -np.inf, dtype=np.float32)
    out_ids[rows], out_scores[rows] = ids, scores
    if positions is not None:
        out_positions = np.full((len(order), ids.shape[1]), PAST_END, dtype=np.int64)
        out_positions[rows] = positions
        positions = out_positions
    return out_ids, out_scores, positions


def first_kept(ranked: np.ndarray, scores: np.ndarray, drop: list[np.ndarray], k: int):
    """The first ``k`` entries of each row not in ``drop[q]`` (order kept; rows short of ``k`` padded with -1 /
    -inf) with their scores, and per row the position just after the last one taken."""
    width = min(k, ranked.shape[1])
    out_ids = np.full((len(ranked), width), NO_ID, ranked.dtype)
    out_scores = np.full((len(ranked), width), -np.inf, np.float32)
    cut = np.full(len(ranked), ranked.shape[1], np.int64)
    for q, (row, sc) in enumerate(zip(ranked, scores)):
        taken = np.flatnonzero(~np.isin(row, drop[q]))[:width]
        out_ids[q, :len(taken)], out_scores[q, :len(taken)] = row[taken], sc[taken]
        if len(taken) == width and width:
            cut[q] = taken[-1] + 1
    return out_ids, out_scores, cut


def rerank_and_evaluate(bench: Benchmark, row_query_ids: np.ndarray, ranked: np.ndarray, scores: np.ndarray,
                        rerank, k: int, protocol_junk_removal: bool = True, keep: dict | None = None,
                        positions: np.ndarray | None = None, per_query: dict | None = None) -> dict:
    """Rerank the top-``k`` of each row with ``rerank(query_ids, ranked, scores, k)`` and score it.

    Revisitop detail (DELG, RRT): each protocol (easy / medium / hard) is reranked separately, with
    that protocol's junk moved out of the list before its top-k is taken. Only that top-k is reranked, so the
    scored list is the reranked top-k followed by the rest of the ranking as it was (its junk is ignored by the
    protocol's metric): no copy of the whole ranking per protocol. ``keep`` receives the reranked top-k
    (per protocol, or under "all"). ``positions``: the rows summarise whole rankings (:func:`metric_rankings`);
    the entries after the top-k keep their places, shifted by the junk taken out before them. ``per_query``
    receives each query's AP per protocol (``Benchmark.evaluate``).
    """
    keep = {} if keep is None else keep
    if bench.protocol.name != "revisitop" or not protocol_junk_removal:
        reranked = rerank(row_query_ids, ranked, scores, k)
        keep["all"] = reranked[:, :k]
        return bench.evaluate(reranked, positions, per_query)   # a summary's top-k is its dense head: places unchanged
    gallery_ids = bench.gallery.column("id").to_numpy()
    out = {}
    for protocol, (_, junk_keys) in REVISITOP_PROTOCOLS.items():
        junk = [gallery_ids[np.concatenate([np.asarray(g[j], np.int64) for j in junk_keys])]
                for g in bench.protocol.gnd]
        top, top_scores, cut = first_kept(ranked, scores, junk, k)
        keep[protocol] = rerank(row_query_ids, top, top_scores, k)
        width = top.shape[1]
        full = np.full_like(ranked, NO_ID)
        full[:, :width] = keep[protocol]
        full_positions = None
        if positions is not None:
            full_positions = np.full_like(positions, PAST_END)
            full_positions[:, :width] = np.arange(width)
        for q, c in enumerate(cut):
            full[q, width:width + ranked.shape[1] - c] = ranked[q, c:]
            if positions is not None:               # rows' heads are dense: entry c is at place c
                rest = positions[q, c:]
                full_positions[q, width:width + len(rest)] = np.where(rest == PAST_END, PAST_END, rest - c + width)
        aps: dict = {}
        out[protocol] = bench.evaluate(full, full_positions, aps)[protocol]
        if per_query is not None:
            per_query[protocol] = aps[protocol]
        del full
    return out
