"""Metric values worked out by hand (see the comments for each number)."""
import math

import numpy as np
import pytest

from rrt_dist.eval.metrics import (average_precision, gldv2_map_at_k, metric_learning, metric_learning_from_ranks,
                                   recall_at_n, revisitop, topk_stable)

# Gallery of 10; query 0: easy {2}, hard {5}, junk {1}; query 1: easy {0}, no hard, no junk.
GND = [{"easy": [2], "hard": [5], "junk": [1]}, {"easy": [0], "hard": [], "junk": []}]
RANKS = np.array([[1, 2, 0, 5, 3, 4, 6, 7, 8, 9],
                  [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]])


def test_average_precision_trapezoid():
    # hits at 0-based ranks 0 and 2 of 2 positives: (1+1)/2 + (1/2+2/3)/2 = 1.58333.. -> / 2
    assert average_precision(np.array([0, 2]), 2) == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    # a missing positive contributes nothing
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5)
    assert average_precision(np.array([], dtype=int), 3) == 0.0
    with pytest.raises(ValueError):
        average_precision(np.array([0]), 0)


def test_revisitop_hand_computed():
    out = revisitop(RANKS, GND)
    # medium q0: junk 1 removed -> [2,0,5,..]: hits at 0 and 2 -> AP 0.791667; q1: hit at 1 -> (0+1/2)/2
    ap_q0 = (1 + (0.5 + 2 / 3) / 2) / 2
    assert out["medium"]["mAP"] == pytest.approx((ap_q0 + 0.25) / 2)
    # easy q0: junk {1,5} -> hit at 0 -> 1; q1 as in medium
    assert out["easy"]["mAP"] == pytest.approx((1.0 + 0.25) / 2)
    # hard: only q0 has positives; junk {1,2} -> [0,5,..]: hit at 1 -> (0 + 1/2)/2
    assert out["hard"]["mAP"] == pytest.approx(0.25)
    # mP@k (revisitop): q0 medium hits at 1-based 1,3 -> @1: 1, @5: 2/min(3,5), @10: 2/3;
    # q1 medium hit at 2 -> @1: 0, @5: 1/2, @10: 1/2
    assert out["medium"]["mP@k"][1] == pytest.approx(0.5)
    assert out["medium"]["mP@k"][5] == pytest.approx((2 / 3 + 0.5) / 2)
    assert out["hard"]["mP@k"] == pytest.approx({1: 0.0, 5: 0.5, 10: 0.5})


def test_revisitop_junk_before_positive_and_distractors():
    # junk ahead of the only positive does not cost precision; ids >= 10 are distractors
    ranks = np.array([[11, 7, 3, 12]])
    gnd = [{"easy": [3], "hard": [], "junk": [7]}]
    out = revisitop(ranks, gnd)
    # after removing junk 7: [11, 3, 12] -> hit at 1 -> (0 + 1/2)/2 = 0.25
    assert out["easy"]["mAP"] == pytest.approx(0.25)
    assert out["medium"]["mAP"] == pytest.approx(0.25)
    assert math.isnan(out["hard"]["mAP"])


def test_revisitop_truncated_ranking():
    out = revisitop(RANKS[:, :3], GND)
    # q0 medium: [1,2,0] -> junk removed [2,0]: one of two positives at 0 -> 0.5; q1: [3,0,1] -> 0.25
    assert out["medium"]["mAP"] == pytest.approx((0.5 + 0.25) / 2)
    # q0 hard: [0] after removing junk {1,2}: no positive retrieved -> AP 0, mP 0
    assert out["hard"]["mAP"] == 0.0
    assert out["hard"]["mP@k"][5] == 0.0


def test_revisitop_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="n_queries=2"):
        revisitop(RANKS[:1], GND)


def test_gldv2_map_at_100():
    solution = {"q1": {"a", "b"}, "q2": {"c"}, "q3": {"d"}}
    predictions = {"q1": ["a", "x", "a", "b"], "q2": ["x", "c"]}
    # q1: a@1 -> 1/1, duplicate a skipped (keeps its rank), b@4 -> 2/4: (1 + .5)/2 = .75
    # q2: c@2 -> 1/2 over min(1, k) = .5; q3 predicted nothing -> 0
    assert gldv2_map_at_k(predictions, solution) == pytest.approx((0.75 + 0.5 + 0) / 3)
    # k=3 cuts b: q1 = 1/min(2,3) = .5
    assert gldv2_map_at_k(predictions, solution, k=3) == pytest.approx((0.5 + 0.5) / 3)
    with pytest.raises(ValueError, match="not in the solution"):
        gldv2_map_at_k({"zz": ["a"]}, solution)


def test_gldv2_normalises_by_min_relevant_k():
    solution = {"q": set(range(200))}
    predictions = {"q": list(range(100))}
    assert gldv2_map_at_k(predictions, solution) == pytest.approx(1.0)


def test_recall_at_n():
    ranks = np.array([[5, 1, 2], [0, 3, 4], [7, 8, 9]])
    # query 2 has no positive and is left out; first hits at 0-based 2 and 0
    out = recall_at_n(ranks, [[2], [0], []], ns=(1, 2, 3))
    assert out == {1: 0.5, 2: 0.5, 3: 1.0}


def test_metric_learning_hand_computed():
    angles = np.deg2rad([0, 30, 50, 105, 115, 220])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1], [2], [3], [1], [5], [1]])  # norm-free
    labels = np.array([0, 1, 0, 1, 1, 2])
    out = metric_learning(emb, labels, recall_ks=(1, 10))
    # rankings: q0 -> 1,2,3,4,5 ; q1 -> 2,0,3,4,5 ; q2 -> 1,0,3,4,5 ; q3 -> 4,2,1,0,5 ; q4 -> 3,2,1,5,0
    # first neighbour correct only for q3 and q4; q5 is alone (R@k miss, excluded elsewhere)
    assert out["R@1"] == pytest.approx(2 / 6)
    assert out["R@10"] == pytest.approx(5 / 6)
    assert out["P@1"] == pytest.approx(2 / 5)
    # q3, q4: R=2, top-2 holds one relevant at rank 1 -> RP .5, MAP@R (1/1)/2 = .5; others 0
    assert out["RP"] == pytest.approx(1 / 5)
    assert out["MAP@R"] == pytest.approx(1 / 5)


def test_metric_learning_with_the_reference_convention_of_r():
    """The ViT-reranking reference counts the query itself in R: R = 2 for q0, 3 for q1 (same rankings as above)."""
    ranks = np.array([[1, 2, 3, 4, 5], [2, 0, 3, 4, 5], [1, 0, 3, 4, 5], [4, 2, 1, 0, 5], [3, 2, 1, 5, 0],
                      [0, 1, 2, 3, 4]])
    labels = np.array([0, 1, 0, 1, 1, 2])
    n_relevant = np.array([1, 2, 1, 2, 2, 0])
    out = metric_learning_from_ranks(ranks, labels, labels, n_relevant, (1,), r_includes_query=True)
    # q0: top-2 (1, 2) holds one, at rank 2 -> RP 1/2, MAP@R (1/2)/2; q1: top-3 (2, 0, 3) -> 1/3, (1/3)/3;
    # q2 like q0; q3: top-3 (4, 2, 1) -> 2/3, (1 + 2/3)/3; q4 like q3
    assert out["RP"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 2 / 3 + 2 / 3) / 5)
    assert out["MAP@R"] == pytest.approx((1 / 4 + 1 / 9 + 1 / 4 + 5 / 9 + 5 / 9) / 5)
    standard = metric_learning_from_ranks(ranks, labels, labels, n_relevant, (1,))
    assert standard["RP"] == pytest.approx(1 / 5) and standard["P@1"] == out["P@1"]


def test_topk_stable_breaks_ties_by_index():
    scores = np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [0.0, 1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(topk_stable(scores, 2), [[1, 2], [0, 1], [3, 2]])
    np.testing.assert_array_equal(topk_stable(scores, 1), [[1], [0], [3]])


def test_gallery_indices_by_offset_and_by_search_agree_chunk_by_chunk():
    from rrt_dist.datasets.base import Benchmark, RevisitopProtocol, make_manifest

    rng = np.random.default_rng(0)
    for ids in (np.arange(5, 505), rng.permutation(np.unique(rng.integers(0, 10**12, 600))[:500])):   # revisitop / any
        bench = Benchmark("b", make_manifest([10**12], [""], "query"), make_manifest(ids, [""] * 500, "gallery"),
                          RevisitopProtocol([{"easy": [0], "hard": [], "junk": []}]))
        ranked = np.stack([rng.permutation(ids)[:300], np.r_[ids[:299], -1]])
        got = bench.gallery_indices(ranked, chunk=77)
        position = {int(i): p for p, i in enumerate(ids)}
        assert got.dtype == np.int32
        assert got.tolist() == [[position.get(int(i), -1) for i in row] for row in ranked]
        with pytest.raises(KeyError, match="ids not in the b gallery"):
            bench.gallery_indices(np.array([ids[0], 10**15]))


def test_per_query_ap_is_each_querys_share_of_the_mean():
    """What the results browser sorts queries by: the APs worked out in test_revisitop_hand_computed, per query
    (NaN where a protocol has no positive); other protocols' AP from their positives (metric learning: the other
    images of the label, the query itself left out of its ranking)."""
    from rrt_dist.datasets.base import Benchmark, MetricLearningProtocol, PositivesProtocol, make_manifest

    per_query: dict = {}
    revisitop(RANKS, GND, per_query=per_query)
    assert per_query["medium"] == pytest.approx([(1 + (0.5 + 2 / 3) / 2) / 2, 0.25])
    assert per_query["easy"] == pytest.approx([1.0, 0.25])
    assert per_query["hard"][0] == pytest.approx(0.25) and math.isnan(per_query["hard"][1])

    gallery = make_manifest(np.arange(100, 104), [""] * 4, "gallery")
    bench = Benchmark("p", make_manifest([7, 8], [""] * 2, "query"), gallery,
                      PositivesProtocol([np.array([1, 3]), np.array([], np.int64)]))
    per_query = {}
    bench.evaluate(np.array([[103, 100, 101, 102], [100, 101, 102, 103]]), per_query=per_query)
    # query 0: positives 101, 103 at 0-based 0 and 2 -> (1 + (1/2 + 2/3) / 2) / 2; query 1 has none
    assert per_query["AP"][0] == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2) and math.isnan(per_query["AP"][1])

    labels = np.array([0, 1, 0, 1])
    leave_one_out = Benchmark("m", gallery, gallery, MetricLearningProtocol(labels), exclude_self=True)
    per_query = {}
    leave_one_out.evaluate(np.array([[100, 102, 101, 103], [101, 100, 102, 103], [102, 101, 100, 103],
                                     [103, 101, 100, 102]]), per_query=per_query)
    # after removing itself: q0 [102, ...] hit at 0 -> 1; q1 [100, 102, 103] hit at 2 -> (0 + 1/3)/2;
    # q2 [101, 100, ...] hit at 1 -> (0 + 1/2)/2; q3 [101, ...] hit at 0 -> 1
    assert per_query["AP"] == pytest.approx([1.0, 1 / 6, 0.25, 1.0])
