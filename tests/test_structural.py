"""Structural similarity against an independent restatement of the reference computation, and the reranker
registry that serves it (pool = in-process, misspelt methods refused before any work)."""
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from rrt_dist.rerank.core import rerank_top_k
from rrt_dist.rerank.methods import known_methods, parse_method
from rrt_dist.rerank.structural import structural_similarity, transport_plans
from rrt_dist.schema import ConfigError


def reference(query_patches, query_center, cand_patches, cand_centers, weighting, center, temperature=0.1,
              ot_temp=0.05, max_iter=100, stop_tol=0.1):
    """The reference computation restated in numpy, candidate by candidate except the batch-wide Sinkhorn stop."""
    def l2n(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    qp, cp = l2n(query_patches), l2n(cand_patches)
    qc, cc = l2n(query_center), l2n(cand_centers)
    if center == "mean":
        qc, cc = l2n(qp.mean(0)), l2n(cp.mean(1))
    n, r = cp.shape[:2]

    def weights(x):
        if weighting == "uniform":
            return np.full_like(x, 1 / len(x))
        x = np.maximum(x, 0)
        w = {"correlation": x, "inverse": np.exp(-x / temperature), "minus": 1 - x}[weighting]
        return w / (w.sum() + 1e-5)

    sims, kernels, us, vs = [], [], [], []
    for i in range(n):
        sim = np.array([[cp[i, a] @ qp[b] for b in range(len(qp))] for a in range(r)])
        sims.append(sim)
        kernels.append(np.exp(-(1 - sim) / ot_temp))
        us.append(weights(np.array([qc @ cp[i, a] for a in range(r)])))
        vs.append(weights(np.array([qp[b] @ cc[i] for b in range(len(qp))])))
    sims, kernels, us, vs = map(np.stack, (sims, kernels, us, vs))
    rows, cols = np.ones_like(us), np.ones_like(vs)
    for _ in range(max_iter):
        before = rows
        rows = us / np.einsum("nij,nj->ni", kernels, cols)
        cols = vs / np.einsum("nij,ni->nj", kernels, rows)
        if np.abs(rows - before).mean() < stop_tol:
            break
    plans = rows[:, :, None] * kernels * cols[:, None, :]
    return (plans * sims).sum(axis=(1, 2))


@pytest.fixture(scope="module")
def patches():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(16, 24))
    query = base + 0.3 * rng.normal(size=base.shape)
    # candidates: the query's own patches shuffled and perturbed (matching ones) and unrelated ones
    cands = np.stack([base[rng.permutation(16)] + s * rng.normal(size=base.shape) for s in (0.2, 0.5, 1.0)]
                     + [rng.normal(size=(16, 24)) for _ in range(3)])
    return query, rng.normal(size=24), cands, rng.normal(size=(6, 24))


@pytest.mark.parametrize("weighting", ["correlation", "inverse", "minus", "uniform"])
@pytest.mark.parametrize("center", ["cls", "mean"])
def test_equals_the_restated_reference_in_float64(patches, weighting, center):
    got = structural_similarity(*patches, weighting=weighting, center=center)
    assert got.dtype == np.float64 and got.shape == (6,)
    np.testing.assert_allclose(got, reference(*patches, weighting, center), rtol=0, atol=1e-6)


def test_uniform_weighting_is_exactly_one_over_r_on_each_side():
    # Query and candidate: the same two orthogonal patches, so sim = I and K = [[1, e], [e, 1]] with e = exp(-20).
    # By hand, from r = c = 1 with u = v = 1/2: r = 1/2 / (1 + e), then c = 1/2 / (r (1 + e)) = 1; the second
    # round repeats them and stops. Plan diagonal r = 1/2 / (1 + e), score 1 / (1 + e). Marginals normalised
    # with the +1e-5 of the other weightings would give 1 / ((1 + e)(1 + 1e-5)) instead.
    eye = torch.eye(2, dtype=torch.float64)
    centre = torch.tensor([1.0, 1.0], dtype=torch.float64)
    parts = transport_plans(eye, centre, eye[None], centre[None], weighting="uniform")
    assert torch.equal(parts["u"], torch.full((1, 2), 0.5, dtype=torch.float64))
    assert torch.equal(parts["v"], torch.full((1, 2), 0.5, dtype=torch.float64))
    score = structural_similarity(eye, centre, eye[None], centre[None], weighting="uniform")
    np.testing.assert_allclose(score.item(), 1 / (1 + np.exp(-20)), rtol=1e-12)
    # Unequal sides: 3 candidate patches against 2 query patches, each side its own 1 / R.
    parts = transport_plans(eye, centre, torch.eye(3, 2, dtype=torch.float64)[None], centre[None], weighting="uniform")
    assert torch.equal(parts["u"], torch.full((1, 3), 1 / 3, dtype=torch.float64))
    assert torch.equal(parts["v"], torch.full((1, 2), 0.5, dtype=torch.float64))


def test_computes_in_the_inputs_dtype_and_device(patches):
    as32 = [x.astype(np.float32) for x in patches]
    assert structural_similarity(*as32).dtype == np.float32
    tensors = [torch.from_numpy(x) for x in patches]
    out = structural_similarity(*tensors, weighting="inverse")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), structural_similarity(*patches, weighting="inverse"), atol=1e-12)


@pytest.mark.parametrize("weighting", ["correlation", "inverse", "uniform"])
def test_matching_patches_score_higher_and_partial_transport_is_an_option(patches, weighting):
    # centres from the patches themselves (the random test centres carry no information)
    scores = structural_similarity(*patches, center="mean", weighting=weighting)
    assert scores[:3].min() > scores[3:].max()                  # shuffled copies beat unrelated grids
    assert np.all(np.diff(scores[:3]) < 0)                      # less noise, more similar
    partial = structural_similarity(*patches, center="mean", weighting=weighting, ot_part=0.8)
    assert partial[:3].min() > partial[3:].max() and np.all(partial < scores)   # 20 % of the mass goes unmatched
    with pytest.raises(ValueError, match="weighting"):
        structural_similarity(*patches, weighting="softmax")


def test_final_order_is_structural_plus_global():
    ids = np.array([10, 11, 12, 13])
    glob = np.array([0.9, 0.8, 0.7, 0.1])
    structural = np.array([0.1, 0.3, 0.25, 0.9])
    assert rerank_top_k(ids, glob, structural, 3, global_weight=1.0).tolist() == [11, 10, 12, 13]


def test_registry_parses_compositions_and_names_the_known_methods():
    assert parse_method("aqe+structural").label == "αQE + Structural" and parse_method("aqe+structural").expand
    assert parse_method("gv").reranker.name == "gv" and parse_method("global").reranker is None
    assert {"structural", "aqe+structural", "aqe+rrt"} <= set(known_methods())
    with pytest.raises(ConfigError, match="known: .*structural"):
        parse_method("structual")
    with pytest.raises(ConfigError, match="unknown method 'aqe\\+gvv'"):
        parse_method("aqe+gvv")


def test_misspelt_method_fails_before_any_extraction(tmp_path):
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "rrt-dist"), "evaluate", "experiment=synthetic_small",
                           f"dataset.root={tmp_path / 'syn'}", "reranker.methods=[global,structurall]",
                           f"hydra.run.dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2 and "rrt-dist: error: reranker.methods: unknown method 'structurall'" in proc.stderr
    assert not (tmp_path / "syn").exists()                      # nothing rendered, nothing extracted


def test_pool_scores_equal_in_process_scores(local_ray, small_synthetic, tmp_path):
    from rrt_dist.datasets import read_revisitop
    from rrt_dist.eval.runner import global_rankings
    from rrt_dist.pipelines.extract import extract_to_lance
    from rrt_dist.pipelines.rerank import RerankPool
    from rrt_dist.rerank.core import RerankCore
    from rrt_dist.schema import ExtractSettings
    from rrt_dist.store import FeatureStore

    _, root = small_synthetic
    bench = read_revisitop(root, "synthetic")
    options = {"model": "tf_efficientnet_lite0", "mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 96, "dim": 64}
    stores = {}
    for name, manifest in (("query", bench.queries), ("gallery", bench.gallery)):
        extract_to_lance(manifest, tmp_path / f"{name}.lance", "dense-grid", options, ExtractSettings(batch_size=8))
        stores[name] = FeatureStore(tmp_path / f"{name}.lance")
    q_ids, q = stores["query"].globals()
    ranked, scores = global_rankings(bench, q_ids, q, stores, None, False)
    query_ids = bench.queries.column("id").to_numpy()
    cfg = {"weighting": "correlation", "center": "mean"}
    pool = RerankPool("structural", cfg, stores["query"], [stores["gallery"]], num_actors=2, chunk=5)
    pooled = pool.rerank(query_ids, ranked, scores, 20)
    pool.close()
    local = RerankCore("structural", cfg, stores["query"], [stores["gallery"]])
    assert np.array_equal(pooled, local.rerank(query_ids, ranked, scores, 20))
    # the pool's order is structural + global over each query's top-20, scored in one call per query
    first = local.queries.take_locals(query_ids[:1])
    cands = local.galleries[0].take_locals(ranked[0, :20])
    direct = structural_similarity(first["local"][0], first["global"][0], cands["local"], cands["global"],
                                   center="mean")
    assert pooled[0, :20].tolist() == rerank_top_k(ranked[0, :20], scores[0, :20], direct, 20, global_weight=1.0).tolist()
    assert not np.array_equal(pooled[:, :20], ranked[:, :20])


def test_structural_figure_draws_maps_and_matches(patches, tmp_path):
    from rrt_dist.eval.figures import structural_figure
    from rrt_dist.features.grid import grid_positions
    from rrt_dist.rerank.structural import transport_plans

    query, centre, cands, _ = patches
    plan = transport_plans(query, centre, cands[:1], cands[:1, 0])["plan"][0].numpy()
    assert plan.shape == (16, 16) and abs(plan.sum() - 1) < 1e-3            # the marginals' mass is moved
    rgb = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    positions = grid_positions(4, 4, 96) * np.array([128 / 96, 1], np.float32)
    pair = {"query_image": rgb, "cand_image": rgb[:, ::-1].copy(), "query_patches": query, "cand_patches": cands[0],
            "query_center": centre, "query_positions": positions, "cand_positions": positions, "plan": plan,
            "status": "positive", "title": "query 0"}
    path = structural_figure([pair, pair], tmp_path / "structural.png")
    assert path.stat().st_size > 20_000


def test_structural_row_beside_gv_reads_its_own_patch_backbone(local_ray, small_synthetic, tmp_path):
    """One report with GV (the run's multi-scale locals) and structural rows (Lite0 7x7 grids of
    reranker.patch_backbone); the structural row equals an independent rerank: structural similarity of the
    patch tables + the run's global cosine over the exact global top-K, then the protocol's metrics."""
    from hydra import compose, initialize_config_dir

    from rrt_dist.config import validate_config
    from rrt_dist.datasets import read_revisitop
    from rrt_dist.eval.runner import global_rankings
    from rrt_dist.pipelines.evaluate import evaluate
    from rrt_dist.store import FeatureStore

    spec, root = small_synthetic
    generated = [f"dataset.{f.name}={getattr(spec, f.name)}" for f in fields(spec)
                 if getattr(spec, f.name) != f.default]            # the fixture's generator settings
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"dataset.root={root}", *generated, "dataset.distractors.name=none", "backbone.options.max_size=128",
            "backbone.options.max_local=60", "backbone.options.scales=[1.0]", "backbone.options.global_scales=[1.0]",
            "+backbone@reranker.patch_backbone=lite0_grid", "reranker.patch_backbone.options.image_size=96",
            "reranker.patch_backbone.options.dim=64", "reranker.methods=[global,gv,structural,superglobal]",
            "reranker.depth=20",
            # two pools of two 1-CPU actors each on a 2-CPU Ray: they must run one after the other
            "reranker.protocol_junk_removal=false", "reranker.structural.center=mean", "reranker.num_actors=2",
            f"features_dir={tmp_path / 'features'}", f"output_dir={tmp_path / 'out'}"])
    validate_config(cfg)
    payload = evaluate(cfg)
    rows, run = payload["results"], payload["run"]
    assert {"Global only", "GV (top-20)", "Structural (top-20)", "SuperGlobal (top-20)"} <= set(rows)
    # each row's cost: seconds per query of its own stage; bytes per gallery image stored beyond the global (GV:
    # 60 fp16 128-d locals, their scale indices and positions; structural: its own 3x3 patch table, global included)
    costs = payload["costs"]["rows"]
    assert costs["Global only"]["stage_s_per_query"] is None and costs["SuperGlobal (top-20)"]["stage_s_per_query"] > 0
    assert {label: c["stored_bytes_per_image"] for label, c in costs.items()} == {
        "Global only": 0, "GV (top-20)": 60 * 128 * 2 + 60 + 4 + 60 * 8, "SuperGlobal (top-20)": 0,
        "Structural (top-20)": 64 * 2 + 9 * 64 * 2 + 9 + 4 + 9 * 8}
    assert costs["GV (top-20)"]["stage_s_per_query"] > 0 and payload["costs"]["global_bytes_per_image"] == 320 * 2
    assert run["patch_backbone"]["name"] == "dense-grid" and run["backbone"]["name"] == "multiscale-cnn"
    assert run["patch_backbone"]["fingerprint"] != run["backbone"]["fingerprint"]
    assert (tmp_path / "out" / "structural.png").exists()
    assert "- patch grids of the structural rows: dense-grid" in (tmp_path / "out" / "report.md").read_text()

    bench = read_revisitop(root, "synthetic")
    main = {k: FeatureStore(t["uri"], t["version"]) for k, t in payload["feature_tables"].items()}
    patches = {k: FeatureStore(t["uri"], t["version"]) for k, t in payload["patch_tables"].items()}
    q_ids, q = main["query"].globals()
    ranked, scores = global_rankings(bench, q_ids, q, main, None, False)
    query_ids = bench.queries.column("id").to_numpy()
    expected = ranked.copy()
    for row, qid in enumerate(query_ids):
        query = patches["query"].take_locals([qid])
        cands = patches["gallery"].take_locals(ranked[row, :20])
        structural = structural_similarity(query["local"][0], query["global"][0], cands["local"], cands["global"],
                                           center="mean")
        expected[row] = rerank_top_k(ranked[row], scores[row], structural, 20, global_weight=1.0)
    reference = bench.evaluate(expected)
    (setting,) = payload["settings"]
    for protocol in ("medium", "hard"):
        assert rows["Structural (top-20)"][setting][protocol]["mAP"] == pytest.approx(reference[protocol]["mAP"],
                                                                                     abs=1e-9)
    assert rows["Structural (top-20)"][setting] != rows["Global only"][setting]

    # the results browser's evidence of each shown structural pair: the plan's 12 heaviest matches and the
    # marginals of every patch (a 3x3 grid at this image size), as fractions of the images
    chunk = (tmp_path / "out" / "browse" / "data" / "queries-0.js").read_text()
    evidence = json.loads(chunk[chunk.index(",") + 1:chunk.rindex(")")])["0"]["evidence"]
    assert set(evidence) == {"gv", "structural"}
    for pair in evidence["structural"].values():
        masses = [m[4] for m in pair["matches"]]
        assert len(masses) == 12 and masses == sorted(masses, reverse=True)
        assert len(pair["query_weights"]) == len(pair["cand_weights"]) == 9
        assert sum(w for *_, w in pair["query_weights"]) == pytest.approx(1, abs=1e-3)
        assert all(0 <= x <= 1 and 0 <= y <= 1 for m in pair["matches"] for x, y in (m[0:2], m[2:4]))


def test_msls_rows_global_and_structural_recall(local_ray, small_synthetic, tmp_path):
    """MSLS's place-recognition protocol (recall@1/5/10/20) with G and G+S rows, on the synthetic test split
    written in MSLS layout; the global row equals recall computed here from the landmarks (not from UTM)."""
    import pickle

    from hydra import compose, initialize_config_dir

    from rrt_dist.config import validate_config
    from rrt_dist.datasets.synthetic import synthetic_as_msls
    from rrt_dist.pipelines.evaluate import evaluate
    from rrt_dist.store import FeatureStore

    _, root = small_synthetic
    counts = synthetic_as_msls(root, tmp_path / "msls")
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "dataset=msls", f"dataset.root={tmp_path / 'msls'}", "dataset.cities=[cph]", "backbone=lite0_grid",
            "backbone.options.image_size=96", "backbone.options.dim=64", "reranker=structural", "reranker.depth=20",
            "reranker.num_actors=0", f"features_dir={tmp_path / 'features'}", f"output_dir={tmp_path / 'out'}"])
    validate_config(cfg)
    payload = evaluate(cfg)
    rows, (setting,) = payload["results"], payload["settings"]
    assert set(rows) == {"Global only", "Structural (top-20)"}
    for row in rows.values():
        recall = [row[setting][f"R@{n}"] for n in (1, 5, 10, 20)]
        assert recall == sorted(recall) and 0 <= recall[0] <= recall[-1] <= 1

    with open(root / "gnd_synthetic.pkl", "rb") as f:
        gnd = pickle.load(f)["gnd"]
    tables = {k: FeatureStore(t["uri"], t["version"]) for k, t in payload["feature_tables"].items()}
    q_ids, q = tables["query"].globals()
    g_ids, g = tables["gallery"].globals()
    assert len(q_ids) == counts["queries"] and len(g_ids) == counts["database"]
    order = np.argsort(-(q[np.argsort(q_ids)] @ g.T), axis=1, kind="stable")    # ids follow the file names' order
    from rrt_dist.datasets import read_msls

    bench = read_msls(tmp_path / "msls", ["cph"])
    # database row n of the MSLS layout is the synthetic gallery image n; query row qi the query qi
    synthetic_index = {i: n for n, i in enumerate(bench.gallery.column("id").to_pylist())}
    query_row = {i: n for n, i in enumerate(bench.queries.column("id").to_pylist())}
    by_query = {query_row[i]: r for r, i in enumerate(np.sort(q_ids).tolist())}
    hits = {n: 0 for n in (1, 5, 10, 20)}
    for qi, entry in enumerate(gnd):
        positives = set(entry["easy"] + entry["hard"] + entry["junk"])
        top = [synthetic_index[g_ids[c]] for c in order[by_query[qi]][:20]]
        for n in hits:
            hits[n] += bool(positives & set(top[:n]))
    for n, h in hits.items():
        assert rows["Global only"][setting][f"R@{n}"] == pytest.approx(h / len(gnd))
