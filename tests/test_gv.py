"""Geometric verification finds a planted affine transform; reranking keeps the tail in global order."""
import numpy as np

from rrt_dist.rerank.core import rerank_top_k
from rrt_dist.rerank.gv import gv_scores, inlier_matches, inliers, mutual_matches
from rrt_dist.rerank.options import GVConfig


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted_pair(seed, n_true=60, n_outliers=40):
    rng = np.random.default_rng(seed)
    desc = unit(rng.normal(size=(n_true + n_outliers, 128)))
    pos = rng.uniform(0, 500, size=(n_true + n_outliers, 2))
    angle = np.deg2rad(25)
    A = 1.3 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    t = np.array([40.0, -15.0])
    tgt_pos = pos @ A.T + t + rng.normal(0, 1.0, size=pos.shape)
    tgt_desc = unit(desc + 0.05 * rng.normal(size=desc.shape))
    tgt_pos[n_true:] = rng.uniform(0, 700, size=(n_outliers, 2))            # descriptors match, geometry does not
    return desc, pos, tgt_desc, tgt_pos, A, t


def test_mutual_matches():
    a = unit(np.array([[1.0, 0], [0, 1.0], [1, 1.0]]))
    b = unit(np.array([[0, 1.0], [1.0, 0.05]]))
    pairs = mutual_matches(a, b, max_distance=0.5)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (1, 0)]
    assert mutual_matches(a, b, max_distance=0.01).tolist() == [[1, 0]]   # (1, 0.05) is 0.05 away


def test_gv_finds_the_planted_transform():
    desc, pos, tgt_desc, tgt_pos, A, t = planted_pair(0)
    pairs = mutual_matches(desc, tgt_desc, 0.9)
    assert len(pairs) == 100
    cfg = GVConfig(ransac_threshold=8.0)
    found = inliers(pos[pairs[:, 0]], tgt_pos[pairs[:, 1]], cfg)
    assert 55 <= found.sum() <= 62                                          # the 60 planted, not the 40 others
    verified = inlier_matches(desc, pos, tgt_desc, tgt_pos, cfg)           # what the results browser draws
    assert len(verified) == found.sum() and np.mean(verified[:, 0] < 60) > 0.95
    assert np.array_equal(verified[:, 0], verified[:, 1])                  # each planted local with its own copy
    assert not inliers(pos[:4], tgt_pos[60:64], GVConfig(min_inliers=5)).any()   # too few to verify: none
    import cv2

    model, _ = cv2.estimateAffine2D(pos[:60].astype(np.float32), tgt_pos[:60].astype(np.float32))
    np.testing.assert_allclose(model[:, :2], A, atol=0.02)
    np.testing.assert_allclose(model[:, 2], t, atol=2.0)
    # an unrelated image: random descriptors and positions -> few or no inliers
    rng = np.random.default_rng(1)
    other = unit(rng.normal(size=(100, 128)))
    scores = gv_scores(desc, pos, np.stack([tgt_desc, other]), np.stack([tgt_pos, rng.uniform(0, 500, (100, 2))]),
                       np.array([100, 100]), cfg)
    assert scores[0] >= 55 and scores[1] < 5


def test_rerank_top_k_orders_by_inliers_then_global_and_keeps_the_tail():
    ids = np.array([10, 11, 12, 13, 14])
    global_scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    out = rerank_top_k(ids, global_scores, np.array([3, 7, 7, 0]), k=4)
    assert out.tolist() == [11, 12, 10, 13, 14]            # ties in inliers keep global order; 14 untouched


def test_rerank_top_k_with_a_global_weight_orders_by_score_plus_weighted_global():
    ids = np.array([10, 11, 12, 13])
    global_scores = np.array([0.9, 0.5, 0.4, 0.1])
    logits = np.array([1.0, 2.0, 2.2, 2.2])
    # by hand, weight 2: 2.8, 3.0, 3.0, 2.4 (11 and 12 tie: global breaks it); weight 10: 10, 7, 6.2, 3.2
    assert rerank_top_k(ids, global_scores, logits, 4, global_weight=2.0).tolist() == [11, 12, 10, 13]
    assert rerank_top_k(ids, global_scores, logits, 4, global_weight=10.0).tolist() == [10, 11, 12, 13]
    assert rerank_top_k(ids, global_scores, logits, 4).tolist() == [12, 13, 11, 10]


def test_gv_top_locals_matches_only_each_images_best_locals():
    """``reranker.gv.top_locals`` (the RRT paper's Table 8): GV on the first m locals of each image, as if only
    those were stored; here the planted matches come after 40 geometric outliers."""
    from rrt_dist.rerank.scorers import GVScorer

    desc, pos, tgt_desc, tgt_pos, _, _ = planted_pair(0)
    order = np.r_[60:100, 0:60]                                              # outliers first
    query = {"local": desc[order], "positions": pos[order], "n_local": np.int64(100)}
    cands = {"local": tgt_desc[order][None], "positions": tgt_pos[order][None], "n_local": np.array([100])}
    cfg = {"ransac_threshold": 8.0}
    assert GVScorer(**cfg)(query, cands)[0] >= 55
    for m in (40, 70, 300):
        n = min(m, 100)
        expected = gv_scores(desc[order][:n], pos[order][:n], tgt_desc[order][None, :n], tgt_pos[order][None, :n],
                             np.array([n]), GVConfig(**cfg))
        assert GVScorer(**cfg, top_locals=m)(query, cands).tolist() == expected.tolist()
    assert GVScorer(**cfg, top_locals=40)(query, cands)[0] < 5                # only the outliers left
