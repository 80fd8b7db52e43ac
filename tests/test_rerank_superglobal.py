"""SuperGlobal reranking against an oracle written here from the paper's equations (Shao et al., ICCV 2023), through
the reranker core both ways it is called: a batch of queries from a table (evaluate, batch search) and queries given
as features (the service)."""
import math

import numpy as np
import pytest

from rrt_dist.rerank.core import RerankCore
from rrt_dist.rerank.methods import check_inputs, get_reranker, parse_method
from rrt_dist.schema import NO_ID


def dot(a, b) -> float:
    return math.fsum(np.multiply(np.asarray(a, np.float64), np.asarray(b, np.float64)))   # exactly rounded


def oracle(q, top, global_scores, m, k, beta):
    """The paper's reranking of one query's ranked candidates ``top`` (global order): the order it gives the whole
    list (indices into ``top``) and the final score of each of the top-M.

    S = X Xᵀ over the top-M. x'ᵢ = Σ wⱼ xⱼ / Σ wⱼ over i itself (w = 1) and its k most similar others by S[i]
    (w = beta · S[i, j]); s'ᵢ = q · x'ᵢ. e = element-wise max of the k first x' by s'; final = (s'ᵢ + e · x'ᵢ) / 2.
    Ties: by place wherever an order is taken; the final order by (final, global score, place)."""
    size = min(m, len(top))
    x = [np.asarray(v, np.float64) for v in top[:size]]
    s = [[dot(a, b) for b in x] for a in x]
    refined = []
    for i in range(size):
        others = sorted((j for j in range(size) if j != i), key=lambda j: (-s[i][j], j))[:k]
        weights = [1.0] + [beta * s[i][j] for j in others]
        refined.append(sum(w * x[j] for w, j in zip(weights, [i, *others])) / sum(weights))
    s_refined = [dot(q, v) for v in refined]
    first = sorted(range(size), key=lambda i: (-s_refined[i], i))[:k]
    e = np.max([refined[i] for i in first], axis=0)
    final = [(s_refined[i] + dot(e, refined[i])) / 2 for i in range(size)]
    order = sorted(range(size), key=lambda i: (-final[i], -global_scores[i], i)) + list(range(size, len(top)))
    return order, final


class GlobalsOnly:
    """A feature table in memory holding global descriptors; reading its locals fails (SuperGlobal reads none)."""

    def __init__(self, ids, vectors):
        self.ids, self.vectors = np.asarray(ids, np.int64), np.asarray(vectors, np.float32)
        self.row = {int(i): r for r, i in enumerate(self.ids)}

    def contains(self, ids):
        return np.isin(np.asarray(ids, np.int64), self.ids)

    def take_globals(self, ids):
        return self.vectors[[self.row[int(i)] for i in np.asarray(ids).ravel()]]

    def take_locals(self, ids):
        raise AssertionError("SuperGlobal read locals")


def unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def dyadic(rng, n, d):
    """Unit vectors with four entries ±1/2 and the rest 0: every product is a multiple of 1/4, computed exactly
    however it is summed, so many similarities tie exactly between different vectors."""
    out = np.zeros((n, d), np.float32)
    for row in out:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return out


def problem(seed, n_queries=4, width=30, d=16):
    """Queries with ranked candidate lists: random unit vectors, exact-tie vectors, copies of earlier candidates,
    and rows cut short by padding (a gallery smaller than the depth)."""
    rng = np.random.default_rng(seed)
    gallery = np.concatenate([unit(rng.normal(size=(40, d))), dyadic(rng, 40, d)])
    gallery = np.concatenate([gallery, gallery[rng.choice(len(gallery), 20)]])      # 20 exact copies
    queries = unit(rng.normal(size=(n_queries, d)))
    queries[1] = dyadic(rng, 1, d)[0]                                     # ties in the query's products too
    ids = np.arange(1000, 1000 + len(gallery))
    ranked = np.full((n_queries, width), NO_ID, np.int64)
    scores = np.full((n_queries, width), -np.inf, np.float32)
    for r, q in enumerate(queries):
        order = np.argsort(-(gallery @ q), kind="stable")[:width - 4 * (r == 2)]      # row 2: padded at the end
        ranked[r, :len(order)], scores[r, :len(order)] = ids[order], (gallery @ q)[order]
    return GlobalsOnly(np.arange(len(queries)), queries), GlobalsOnly(ids, gallery), ranked, scores


@pytest.mark.parametrize("seed,m,k,beta", [(0, 400, 9, 0.15), (1, 20, 9, 0.15), (2, 30, 3, 0.5), (3, 12, 1, 0.15)])
def test_superglobal_equals_the_papers_equations_ties_included(seed, m, k, beta):
    query_table, gallery, ranked, scores = problem(seed)
    core = RerankCore("superglobal", {"m": m, "k": k, "beta": beta}, query_table, [gallery])
    depth = 26
    query_ids = np.arange(len(ranked))
    query_ids[3] = NO_ID                                        # a query without a descriptor: left as it was
    out, rerank_scores = core.rerank_with_scores(query_ids, ranked, scores, depth)
    np.testing.assert_array_equal(out[3], ranked[3])
    assert np.isnan(rerank_scores[3]).all()
    ties = 0
    for r in range(3):
        head = ranked[r, :depth][ranked[r, :depth] != NO_ID]
        vectors = gallery.take_globals(head)
        order, final = oracle(query_table.vectors[r], vectors, scores[r, :len(head)], m, k, beta)
        np.testing.assert_array_equal(out[r, :len(head)], head[order])                   # the same ranking
        np.testing.assert_array_equal(out[r, len(head):], ranked[r, len(head):])         # the rest as it was
        size = min(m, len(head))
        np.testing.assert_allclose(rerank_scores[r, :size], np.asarray(final)[order[:size]], atol=1e-6, rtol=0)
        assert np.isnan(rerank_scores[r, size:]).all()          # past the top-M: not reranked
        ties += len(final) - len(set(np.round(final, 12)))
        # the service's path: the same query given as features, alone and in a batch
        alone = core.rerank_query({"global": query_table.vectors[r:r + 1]}, ranked[r], scores[r], depth)
        np.testing.assert_array_equal(alone[0], out[r])
        np.testing.assert_allclose(alone[1], rerank_scores[r, :size], atol=1e-6, rtol=0)
    assert ties, "the problem has no tied final scores: the tie rule went untested"
    batch = core.rerank_queries([{"global": query_table.vectors[r:r + 1]} for r in range(3)], list(ranked[:3]),
                                list(scores[:3]), depth)
    for r, (order, reranked_scores) in enumerate(batch):
        np.testing.assert_array_equal(order, out[r])
        assert len(reranked_scores) == min(m, (ranked[r, :depth] != NO_ID).sum())


def test_superglobal_is_a_registry_reranker_of_globals_only():
    entry = get_reranker("superglobal")
    assert parse_method("aqe+superglobal").reranker is entry and entry.label == "SuperGlobal"
    check_inputs(["superglobal"], {"backbone": ("global",)})    # a global-only extractor's tables suffice
    assert entry.create().cfg.m == 400 and entry.create().cfg.k == 9 and entry.create().cfg.beta == 0.15
    assert entry.reranked_depth(100, {"m": 400}) == 100 and entry.reranked_depth(1000, {"m": 400}) == 400
