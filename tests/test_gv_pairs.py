"""Pairs taught by geometric verification (train.pairs=gv): the mined pairs against an independent computation, the
threshold rule and the pair lists."""
import numpy as np
import pyarrow as pa

from rrt_dist.train.gv_pairs import otsu_threshold, pair_rows, pair_triplets


def place_gallery(uri: str, n_places: int = 4, per_place: int = 4, n_local: int = 24, seed: int = 0):
    """A small feature table whose images are views of ``n_places`` places: a view holds most of its place's local
    descriptors (noisy) at its place's points moved by a random affine map, plus clutter; globals are the place's
    plus noise. GV verifies views of one place and nothing else."""
    from rrt_dist.store import FeatureStore, commit_fragments, features_schema, features_to_table, write_fragment

    rng = np.random.default_rng(seed)
    n = n_places * per_place
    base_local = rng.normal(size=(n_places, n_local, 128))
    base_points = rng.uniform(0, 400, size=(n_places, n_local, 2))
    base_global = rng.normal(size=(n_places, 64))
    local, positions, globals_ = np.empty((n, n_local, 128)), np.empty((n, n_local, 2)), np.empty((n, 64))
    for i in range(n):
        p = i // per_place
        shown = rng.random(n_local) < 0.8
        local[i] = np.where(shown[:, None], base_local[p] + 0.1 * rng.normal(size=(n_local, 128)),
                            rng.normal(size=(n_local, 128)))
        affine = np.array([[1, 0], [0, 1]]) * rng.uniform(0.8, 1.2) + rng.normal(scale=0.1, size=(2, 2))
        positions[i] = np.where(shown[:, None], base_points[p] @ affine.T + rng.uniform(-50, 50, 2),
                                rng.uniform(0, 400, (n_local, 2)))
        globals_[i] = base_global[p] + 0.7 * rng.normal(size=64)
    local /= np.linalg.norm(local, axis=2, keepdims=True)
    globals_ /= np.linalg.norm(globals_, axis=1, keepdims=True)
    ids = np.arange(1000, 1000 + n) * 7919            # not row positions
    schema = features_schema(64, 128, n_local, "test-places", {}, "test")
    table = features_to_table(schema, ids, globals_, local, positions, np.zeros((n, n_local)), np.full(n, n_local))
    commit_fragments(uri, schema, write_fragment(uri, table))
    return FeatureStore(uri)


def test_mined_pairs_are_the_exact_top_k_and_random_partners_with_gv_inliers_of_the_gv_core(tmp_path):
    """Mining in-process (no Ray): each anchor's candidates are its exact top-k by numpy (itself excluded) and random
    gallery images not among them; every pair's inliers are what the GV core counts for it; blocks resume."""
    from rrt_dist.index.exact import block_searcher
    from rrt_dist.pipelines.mine import mine_pairs, mined_blocks
    from rrt_dist.pipelines.rerank import RerankPool
    from rrt_dist.rerank.gv import gv_scores
    from rrt_dist.rerank.options import GVConfig

    store = place_gallery(str(tmp_path / "gallery.lance"))
    ids, globals_ = store.globals()
    k, r = 5, 3
    search = block_searcher(lambda: store.global_blocks(7), len(ids))
    opened = []

    def open_pool():
        opened.append(RerankPool("gv", {}, store, [store], num_actors=0))
        return opened[-1]

    folder = mine_pairs(store, ids, search, open_pool, tmp_path / "mined", k, r, seed=3, block_rows=6)
    pairs = pa.concat_tables(list(mined_blocks(folder))).to_pandas()
    assert len(opened) == 3                                  # 16 anchors, blocks of 6: one pool per block
    sorted_ids = np.sort(ids)
    row = {int(i): n for n, i in enumerate(ids)}
    features = store.take_locals(sorted_ids)
    at = {int(i): n for n, i in enumerate(sorted_ids)}
    for anchor in sorted_ids:
        mine = pairs[pairs.anchor == anchor]
        top = mine[~mine.random]
        similarity = globals_ @ globals_[row[int(anchor)]]
        exact = [int(ids[j]) for j in np.argsort(-similarity) if ids[j] != anchor][:k]
        assert top.candidate.tolist() == exact                              # in global order, self excluded
        np.testing.assert_allclose(top["global"], np.sort(similarity)[::-1][1:k + 1], atol=1e-3)   # fp16 table
        partners = mine[mine.random].candidate.to_numpy()
        assert len(partners) <= r and anchor not in partners and not np.isin(partners, exact).any()
        assert np.isin(partners, sorted_ids).all() and len(np.unique(partners)) == len(partners)
        a = at[int(anchor)]
        cand = [at[int(c)] for c in mine.candidate]
        expected = gv_scores(features["local"][a], features["positions"][a], features["local"][cand],
                             features["positions"][cand], features["n_local"][cand], GVConfig())
        assert mine.inliers.tolist() == expected.tolist()
    # the teacher tells places apart: every top-k pair within a place verifies, hardly any across places
    place = {int(i): n // 4 for n, i in enumerate(ids)}
    same = pairs.apply(lambda p: place[p.anchor] == place[p.candidate], axis=1)
    assert pairs.inliers[same].min() > 3 * pairs.inliers[~same].max()
    # a rerun finds every block mined and opens no pool
    mine_pairs(store, ids, search, open_pool, folder, k, r, seed=3, block_rows=6)
    assert len(opened) == 3


def test_otsu_threshold_splits_gv_counts_at_the_valley():
    # unrelated pairs: 0-6 inliers; verified ones: 25-300. Otsu on log(1 + x) cuts between 6 and 25.
    counts = np.array([0, 0, 0, 1, 2, 3, 3, 4, 5, 6, 25, 40, 80, 300])
    assert otsu_threshold(counts) == 25
    # by hand: two levels are one cut, the upper level is the threshold; one level: above everything
    assert otsu_threshold(np.array([0, 0, 10])) == 10
    assert otsu_threshold(np.array([4, 4, 4])) == 5


def test_pair_rows_and_triplets_follow_the_threshold_and_leave_held_out_images_out():
    # rows 0-2 train, -1 = a held-out image; (anchor, candidate, inliers)
    anchors = np.array([0, 0, 0, 1, 1, 2, 0, 2])
    candidates = np.array([1, 2, -1, 0, 2, 0, 1, -1])
    inliers = np.array([30, 2, 50, 30, 9, 1, 12, 40])
    pairs = pair_rows(anchors, candidates, inliers, 10, 3)
    lists = {name: [pairs[name][pairs[f"{name}_offsets"][a]:pairs[f"{name}_offsets"][a + 1]].tolist()
                    for a in range(3)] for name in ("positives", "negatives")}
    assert lists == {"positives": [[1, 1], [0], []], "negatives": [[2], [2], [0]]}
    assert pairs["anchors"].tolist() == [0, 1]             # row 2 has no positive among training rows
    assert pairs["units"].tolist() == [0, 1, 2]            # an epoch: every positive pair of those anchors once
    triplets = pair_triplets(np.array([2, 0, 1, 0]), pairs, np.random.default_rng(0))
    assert triplets.tolist() == [[1, 0, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]]

