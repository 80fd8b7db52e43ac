"""Reranking in a Ray actor pool: same rankings as in-process, survives a killed actor; revisitop junk handling."""
import numpy as np
import pytest
import ray

from rrt_dist.datasets import read_r1m, read_revisitop
from rrt_dist.eval.metrics import REVISITOP_PROTOCOLS
from rrt_dist.eval.runner import first_kept, global_rankings, rerank_and_evaluate
from rrt_dist.pipelines.extract import extract_to_lance
from rrt_dist.pipelines.rerank import RerankPool
from rrt_dist.schema import ExtractSettings
from rrt_dist.store import FeatureStore

OPTIONS = dict(model="tf_efficientnet_lite0", mean=[0.5] * 3, std=[0.5] * 3, scales=[0.7071, 1.0],
               global_scales=[1.0], max_size=256, max_local=100)


@pytest.fixture(scope="module")
def tables(local_ray, small_synthetic, tmp_path_factory):
    _, root = small_synthetic
    bench = read_revisitop(root, "synthetic", read_r1m(root / "distractors", limit=10))
    out = tmp_path_factory.mktemp("rerank")
    splits = np.asarray(bench.gallery.column("split").to_pylist())
    import pyarrow as pa

    for name, manifest in (("query", bench.queries), ("gallery", bench.gallery.filter(pa.array(splits == "gallery"))),
                           ("distractor", bench.gallery.filter(pa.array(splits == "distractor")))):
        extract_to_lance(manifest, out / f"{name}.lance", "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=8))
    stores = {n: FeatureStore(out / f"{n}.lance") for n in ("query", "gallery", "distractor")}
    q_ids, q = stores["query"].globals()
    ranked, scores = global_rankings(bench, q_ids, q, stores, None, True)
    return bench, stores, ranked, scores


def test_first_kept_keeps_order_pads_and_says_where_it_stopped():
    ranked = np.array([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)
    out, sc, cut = first_kept(ranked, scores, [np.array([6, 8]), np.array([2, 3, 4, 5])], 3)
    assert out.tolist() == [[5, 7, 9], [1, -1, -1]]
    assert sc[0].tolist() == pytest.approx([0.9, 0.7, 0.5]) and sc[1, 0] == pytest.approx(0.9)
    assert cut.tolist() == [5, 5]                    # row 0 used all five; row 1 ran out
    out, _, cut = first_kept(ranked, scores, [np.array([6]), np.array([], np.int64)], 2)
    assert out.tolist() == [[5, 7], [1, 2]] and cut.tolist() == [3, 2]


def test_actor_pool_equals_in_process_and_survives_a_kill(tables):
    bench, stores, ranked, scores = tables
    galleries = [stores["gallery"], stores["distractor"]]
    query_ids = bench.queries.column("id").to_numpy()
    local = RerankPool("gv", {}, stores["query"], galleries, num_actors=0)
    expected = local.rerank(query_ids, ranked, scores, 20)
    assert not np.array_equal(expected[:, :20], ranked[:, :20])           # GV changed some orders
    np.testing.assert_array_equal(expected[:, 20:], ranked[:, 20:])       # the tail keeps global order
    for row_e, row_r in zip(expected, ranked):
        assert sorted(row_e[:20]) == sorted(row_r[:20])                   # the top-20 is a permutation
    pool = RerankPool("gv", {}, stores["query"], galleries, num_actors=2, chunk=3)
    np.testing.assert_array_equal(pool.rerank(query_ids, ranked, scores, 20), expected)
    victim = pool.actors[0]
    pid = ray.get(victim.pid.remote())
    ray.kill(victim, no_restart=False)                                   # killed mid-run: replaced, calls retried
    np.testing.assert_array_equal(pool.rerank(query_ids, ranked, scores, 20), expected)
    assert ray.get(victim.pid.remote()) != pid
    pool.close()


def test_protocol_junk_is_removed_before_the_top_k(tables):
    bench, stores, ranked, scores = tables
    seen = []

    def rerank(query_ids, r, s, k):
        seen.append(r.copy())
        return r

    rerank_and_evaluate(bench, bench.queries.column("id").to_numpy(), ranked, scores, rerank, 10)
    assert len(seen) == 3                                                  # easy, medium, hard separately
    gallery_ids = bench.gallery.column("id").to_numpy()
    medium = seen[1]
    for q, g in enumerate(bench.protocol.gnd):
        junk = gallery_ids[np.asarray(g["junk"], np.int64)]
        assert not np.isin(medium[q], junk).any()
        hard_junk = gallery_ids[np.concatenate([g["junk"], g["easy"]]).astype(np.int64)]
        assert not np.isin(seen[2][q], hard_junk).any()
        assert medium.shape[1] == 10                          # only the top-k crosses to the reranker
    plain = rerank_and_evaluate(bench, bench.queries.column("id").to_numpy(), ranked, scores, rerank, 10,
                                protocol_junk_removal=False)
    assert plain == bench.evaluate(ranked)

    # against the whole-list computation: junk dropped from every row, top-10 reversed, the rest kept
    def reverse(query_ids, r, s, k):
        return np.concatenate([r[:, :k][:, ::-1], r[:, k:]], axis=1)

    kept: dict = {}
    got = rerank_and_evaluate(bench, bench.queries.column("id").to_numpy(), ranked, scores, reverse, 10, keep=kept)
    for protocol, (_, junk_keys) in REVISITOP_PROTOCOLS.items():
        rows = []
        for q, g in enumerate(bench.protocol.gnd):
            junk = gallery_ids[np.concatenate([np.asarray(g[j], np.int64) for j in junk_keys])]
            row = ranked[q][~np.isin(ranked[q], junk)]
            rows.append(np.concatenate([row[:10][::-1], row[10:]]))
        width = max(map(len, rows))
        whole = np.stack([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows])
        assert got[protocol] == bench.evaluate(whole)[protocol]
        np.testing.assert_array_equal(kept[protocol], whole[:, :10])
    assert got != bench.evaluate(ranked)                  # the reversal changed something


def test_rrt_pool_with_a_checkpoint_and_a_kill_mid_call(tables, tmp_path):
    import torch

    from rrt_dist.models.rrt import RerankingTransformer

    bench, stores, ranked, scores = tables
    torch.manual_seed(0)
    model = RerankingTransformer(global_dim=stores["query"].global_dim)
    torch.save({"state": model.state_dict(), "optim": {}}, tmp_path / "rrt.pth")
    galleries = [stores["gallery"], stores["distractor"]]
    query_ids = bench.queries.column("id").to_numpy()
    cfg = {"checkpoint": str(tmp_path / "rrt.pth")}
    expected = RerankPool("rrt", cfg, stores["query"], galleries, num_actors=0).rerank(query_ids, ranked, scores, 10)
    pool = RerankPool("rrt", cfg, stores["query"], galleries, num_actors=1, chunk=4)
    actor = pool.actors[0]
    refs = [actor.rerank.remote(query_ids[s:s + 4], ranked[s:s + 4], scores[s:s + 4], 10)
            for s in range(0, len(query_ids), 4)]
    ray.kill(actor, no_restart=False)                  # dies with calls in flight: restarted, calls retried
    np.testing.assert_array_equal(np.concatenate(ray.get(refs)), expected)
    pool.close()


@pytest.mark.timeout(180)
def test_an_actor_failing_the_same_way_each_time_ends_with_its_own_error(tables, tmp_path):
    """A scorer whose constructor always raises (weights that are not there) is restarted a bounded number of
    times, then the call fails with that error: never retried forever."""
    from ray.exceptions import RayActorError

    bench, stores, ranked, scores = tables
    pool = RerankPool("rrt", {"checkpoint": str(tmp_path / "missing.pth")}, stores["query"],
                      [stores["gallery"]], num_actors=1)
    with pytest.raises(RayActorError, match="missing.pth"):
        pool.rerank(bench.queries.column("id").to_numpy()[:4], ranked[:4], scores[:4], 10)
    pool.close()
