"""The synthetic benchmark: deterministic, parallel = serial, sound ground truth, and hard enough."""
import json
import pickle

import numpy as np
import pytest

from rrt_dist.datasets import load_distractors, read_folder, read_r1m, read_revisitop
from rrt_dist.datasets.generate import generate_synthetic
from rrt_dist.datasets.options import SyntheticSpec
from rrt_dist.datasets.synthetic import plan, render_item
from rrt_dist.schema import SyntheticRootMismatch


def test_rendering_is_deterministic():
    spec = SyntheticSpec(seed=5, n_landmarks=2)
    item = [it for it in plan(spec) if it.role == "gallery"][3]
    a, meta_a = render_item(spec, item)
    b, meta_b = render_item(spec, item, scene_cache={})
    np.testing.assert_array_equal(a, b)
    assert meta_a["difficulty"] == meta_b["difficulty"]
    other, _ = render_item(SyntheticSpec(seed=6, n_landmarks=2), item)
    assert not np.array_equal(a, other)


def test_layout_and_ground_truth(small_synthetic):
    spec, root = small_synthetic
    bench = read_revisitop(root, "synthetic", read_r1m(root / "distractors"))
    assert bench.queries.num_rows == spec.n_landmarks * spec.queries_per_landmark
    assert bench.gallery.num_rows == spec.n_landmarks * spec.views_per_landmark + spec.n_distractors
    with open(root / "gnd_synthetic.pkl", "rb") as f:
        cfg = pickle.load(f)
    names = cfg["imlist"]
    totals = {"easy": 0, "hard": 0, "junk": 0}
    for q, g in enumerate(cfg["gnd"]):
        lists = [set(g[k]) for k in ("easy", "hard", "junk")]
        assert not (lists[0] & lists[1] or lists[0] & lists[2] or lists[1] & lists[2])
        # exactly the views of the query's own landmark are labelled, each once
        landmark = cfg["qimlist"][q].split("/")[1][1:6]
        own = {i for i, n in enumerate(names) if n.split("/")[1][1:6] == landmark}
        assert set().union(*lists) == own
        assert g["easy"] or g["hard"], "every query needs a positive"
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 < spec.view_width and 0 <= y1 < y2 < spec.view_height
        for k in totals:
            totals[k] += len(g[k])
    assert totals["easy"] > 0 and totals["hard"] > 0
    train = read_folder(root / "train")
    assert train.gallery.num_rows == spec.n_train_landmarks * spec.train_views_per_landmark
    assert len(set(train.gallery.column("label").to_pylist())) == spec.n_train_landmarks
    meta = json.loads((root / "meta.json").read_text())
    assert meta["fingerprint"] == spec.fingerprint() and meta["stats"]["test"]["easy"] == totals["easy"]


def test_generation_is_idempotent_and_refuses_other_settings(small_synthetic):
    spec, root = small_synthetic
    before = (root / "gnd_synthetic.pkl").stat().st_mtime_ns
    assert generate_synthetic(spec, root)["fingerprint"] == spec.fingerprint()
    assert (root / "gnd_synthetic.pkl").stat().st_mtime_ns == before  # nothing rewritten
    with pytest.raises(SyntheticRootMismatch, match="choose another dataset.root"):
        generate_synthetic(SyntheticSpec(seed=99), root)


def test_ray_generation_equals_serial_and_resumes(local_ray, tmp_path):
    spec = SyntheticSpec(seed=1, n_landmarks=4, n_val_landmarks=1, n_train_landmarks=2, views_per_landmark=4,
                         train_views_per_landmark=2, n_distractors=10)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    import ray

    assert ray.is_initialized()  # the parallel run uses Ray tasks
    generate_synthetic(spec, parallel)
    # an interrupted run: meta.json missing, one image truncated -> a rerun restores everything
    (parallel / "meta.json").unlink()
    victim = parallel / "jpg/test/g00001_02.jpg"
    victim.write_bytes(victim.read_bytes()[:100])
    generate_synthetic(spec, parallel)
    # serial reference without Ray
    ray.shutdown()
    try:
        generate_synthetic(spec, serial)
    finally:
        from rrt_dist.config import RayConfig
        from rrt_dist.runtime import init_ray

        init_ray(RayConfig(num_cpus=2))
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    for rel in files:
        assert (serial / rel).read_bytes() == (parallel / rel).read_bytes(), rel


def test_distractor_config(small_synthetic):
    from omegaconf import OmegaConf

    _, root = small_synthetic
    cfg = OmegaConf.create({"name": "synthetic", "root": str(root), "distractors": {"name": "synthetic", "root": None,
                                                                                     "limit": 7}})
    assert load_distractors(cfg).num_rows == 7
    cfg.distractors.name = "r1m"
    with pytest.raises(ValueError, match="revisitop1m folder"):
        load_distractors(cfg)
