"""Pair sampling rules of the RRT paper on a hand-made neighbour table."""
import numpy as np
import pytest

from rrt_dist.index.exact import exact_searcher
from rrt_dist.train.sampler import (anchor_shard, eligible_anchors, sample_triplets,
                                    training_neighbours)

# 12 images, labels: A x6 (rows 0-5), B x4 (rows 6-9), C x2 (rows 10-11). Top-8 neighbours (self excluded).
LABELS = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
NEIGHBOURS = np.array([
    [1, 2, 3, 4, 5, 6, 7, 10],     # 0: 5 same (1-5), negatives 6, 7, 10         -> anchor
    [0, 2, 6, 3, 7, 4, 8, 9],      # 1: 4 same                                    -> not
    [0, 1, 3, 4, 5, -1, -1, -1],   # 2: 5 same, no different label in its top-k  -> not (no negative)
    [5, 4, 6, 2, 1, 0, 11, -1],    # 3: 5 same, negatives 6, 11                   -> anchor
    [6, 7, 8, 9, 10, 11, 0, 1],    # 4: 2 same                                    -> not
    [4, 3, 2, 1, 0, 9, 9, 9],      # 5: 5 same, negative 9                        -> anchor
    [7, 8, 9, 0, 1, 2, 3, 4],      # 6: 3 same                                    -> not
    [6, 8, 9, 0, 1, 2, 3, 4],
    [6, 7, 9, 0, 1, 2, 3, 4],
    [6, 7, 8, 0, 1, 2, 3, 4],
    [11, 0, 1, 2, 3, 4, 5, 6],     # 10: 1 same                                   -> not
    [10, 0, 1, 2, 3, 4, 5, 6],
])


def test_anchors_need_min_positives_and_a_negative():
    assert eligible_anchors(NEIGHBOURS, LABELS, 5).tolist() == [0, 3, 5]
    assert eligible_anchors(NEIGHBOURS, LABELS, 3).tolist() == [0, 1, 3, 5, 6, 7, 8, 9]


def test_topk_scope_draws_positive_and_negative_from_the_top_k():
    rng = np.random.default_rng(0)
    anchors = np.array([0, 3, 5])
    seen_pos, seen_neg = {a: set() for a in anchors}, {a: set() for a in anchors}
    for _ in range(300):
        for a, p, n in sample_triplets(anchors, NEIGHBOURS, LABELS, rng, "topk"):
            assert p in NEIGHBOURS[a] and n in NEIGHBOURS[a]
            assert LABELS[p] == LABELS[a] and LABELS[n] != LABELS[a] and p != a
            seen_pos[a].add(int(p))
            seen_neg[a].add(int(n))
    assert seen_pos[0] == {1, 2, 3, 4, 5} and seen_neg[0] == {6, 7, 10}      # uniform over the candidates
    assert seen_pos[3] == {0, 1, 2, 4, 5} and seen_neg[3] == {6, 11}
    assert seen_neg[5] == {9}


def test_label_scope_draws_positives_outside_the_top_k():
    rng = np.random.default_rng(1)
    nn = NEIGHBOURS.copy()
    nn[0] = [1, 2, 3, 4, 6, 7, 10, -1]       # row 5 (label A) is not among 0's neighbours
    positives = {int(t[1]) for _ in range(300) for t in sample_triplets(np.array([0]), nn, LABELS, rng, "label")}
    assert positives == {1, 2, 3, 4, 5}
    assert {int(t[1]) for _ in range(100) for t in sample_triplets(np.array([0]), nn, LABELS, rng, "topk")} == {1, 2, 3, 4}


def test_anchor_shards_are_disjoint_equal_and_change_per_epoch():
    anchors = np.arange(101) * 3
    shards = [anchor_shard(anchors, 4, seed=7, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    union = np.concatenate(shards)
    assert len(np.unique(union)) == 99 and np.isin(union, anchors).all()
    np.testing.assert_array_equal(shards[1], anchor_shard(anchors, 4, seed=7, rank=1, world_size=3))   # seeded
    assert not np.array_equal(shards[0], anchor_shard(anchors, 5, seed=7, rank=0, world_size=3))


def blocks_of(ids: np.ndarray, vectors: np.ndarray, size: int, order: np.ndarray):
    return [(ids[order[s:s + size]], vectors[order[s:s + size]]) for s in range(0, len(ids), size)]


def test_training_neighbours_exclude_self_and_map_ids_to_rows():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.permutation(10_000)[:30].astype(np.int64) - 5_000      # negative ids too
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    search = exact_searcher(vectors, ids)
    in_order = training_neighbours(search, blocks_of(ids, vectors, 30, np.arange(30)), ids, k=5)
    np.testing.assert_array_equal(in_order, expected)
    assert in_order.dtype == np.int32
    # the rows' globals streamed in blocks of 7, in any order: the same table
    scrambled = training_neighbours(search, blocks_of(ids, vectors, 7, rng.permutation(30)), ids, k=5)
    np.testing.assert_array_equal(scrambled, expected)
    padded = training_neighbours(exact_searcher(vectors[:4], ids[:4]), blocks_of(ids[:4], vectors[:4], 3, np.arange(4)),
                                 ids[:4], k=5)
    assert (padded[:, 3:] == -1).all() and not (padded[:, :3] == np.arange(4)[:, None]).any()
    with pytest.raises(ValueError, match="not training rows"):
        training_neighbours(search, blocks_of(ids, vectors, 30, np.arange(30)), ids[:20], k=5)


def test_unknown_positive_scope_is_rejected():
    with pytest.raises(ValueError, match="positive_scope"):
        sample_triplets(np.array([0]), NEIGHBOURS, LABELS, np.random.default_rng(0), "everything")
