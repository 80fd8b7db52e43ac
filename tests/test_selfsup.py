"""Self-supervised RRT pairs: views of a gallery's own images, deterministic by seed, true correspondences,
and training through the RRT loop without labels."""
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from skimage import data

from rrt_dist.datasets import make_manifest
from rrt_dist.datasets.selfsup import ViewSpec, render_views, selfsup_manifest, write_views
from rrt_dist.store import FeatureStore

REPO = Path(__file__).resolve().parent.parent


def _photos(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("astronaut", "coffee", "rocket"):
        paths.append(str(folder / f"{name}.png"))
        cv2.imwrite(paths[-1], cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR))
    return paths


def test_views_are_deterministic_by_seed_and_labelled_by_their_source(tmp_path):
    uris = _photos(tmp_path / "photos")
    sources = make_manifest([11, 12, 13], uris, "gallery")
    spec = ViewSpec(views=2, seed=5)
    first, again = write_views(sources, tmp_path / "a", spec), write_views(sources, tmp_path / "b", spec)
    assert first.num_rows == 6
    assert first.drop_columns(["uri"]).equals(again.drop_columns(["uri"]))
    for a, b in zip(first.column("uri").to_pylist(), again.column("uri").to_pylist()):
        assert Path(a).name == Path(b).name and Path(a).read_bytes() == Path(b).read_bytes()
    assert pq.read_table(tmp_path / "a" / "views.parquet").equals(first.replace_schema_metadata(
        pq.read_table(tmp_path / "a" / "views.parquet").schema.metadata))
    written = {p: Path(p).stat().st_mtime_ns for p in first.column("uri").to_pylist()}
    assert write_views(sources, tmp_path / "a", spec).equals(first)               # a rerun renders nothing again
    assert all(Path(p).stat().st_mtime_ns == t for p, t in written.items())
    other = write_views(sources, tmp_path / "c", ViewSpec(views=2, seed=6))
    assert not np.allclose(np.stack(first.column("homography").to_pylist()),
                           np.stack(other.column("homography").to_pylist()))
    assert set(other.column("id").to_pylist()).isdisjoint(first.column("id").to_pylist())
    stored = write_views(sources, "memory://store/selfsup/a", spec)          # storage_root may be a URI
    assert stored.drop_columns(["uri"]).equals(first.drop_columns(["uri"]))
    for uri, local in zip(stored.column("uri").to_pylist(), first.column("uri").to_pylist()):
        assert uri.startswith("memory://store/selfsup/a/views/") and fsspec.open(uri, "rb").open().read() == \
            Path(local).read_bytes()
    assert fsspec.filesystem("memory").isfile("/store/selfsup/a/views.parquet")

    manifest = selfsup_manifest(sources, first)
    label = dict(zip(manifest.column("id").to_pylist(), manifest.column("label").to_pylist()))
    assert [label[i] for i in (11, 12, 13)] == [11, 12, 13]
    assert all(label[v] == s for v, s in zip(first.column("id").to_pylist(), first.column("source_id").to_pylist()))


def _mutual_matches(a, b):
    sim = a.local @ b.local.T
    a2b, b2a = sim.argmax(1), sim.argmax(0)
    kept = np.flatnonzero(b2a[a2b] == np.arange(len(a2b)))
    return kept, a2b[kept]


def _mapped(H, points):
    p = np.c_[points, np.ones(len(points))] @ np.asarray(H).T
    return p[:, :2] / p[:, 2:]


def test_view_positives_are_true_correspondences(tmp_path):
    """The recorded homography maps the source's locals onto their mutual nearest neighbours in the view (within
    a 24-pixel tolerance, the backbone's stride at the coarser scale); another view's homography, or a view of
    another photo, does not (measured: 90-95 % inliers; 3-14 % with another view's homography; 0-3 %)."""
    from rrt_dist.features import create_extractor, create_preparer
    from rrt_dist.features.core import extract_rows

    options = {"model": "tf_efficientnet_lite0", "mean": [0.5] * 3, "std": [0.5] * 3, "scales": [0.7071, 1.0],
               "global_scales": [1.0], "max_local": 200}
    extractor, preparer = create_extractor("multiscale-cnn", **options), create_preparer("multiscale-cnn", **options)

    def features(image, name):
        path = str(tmp_path / name)
        cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        _, [f], _ = extract_rows(extractor, preparer, [{"id": 1, "uri": path, "bbox": None}])
        return f

    spec = ViewSpec(views=3, difficulty=0.6)
    source = features(data.astronaut(), "source.png")
    views = render_views(data.astronaut(), 7, spec)
    elsewhere = render_views(data.coffee(), 8, spec)
    for n, (view, H) in enumerate(views):
        target = features(view, f"view{n}.png")
        src, tgt = _mutual_matches(source, target)
        assert len(src) >= 30

        def inliers(H_):
            return float((np.linalg.norm(_mapped(H_, source.positions[src]) - target.positions[tgt], axis=1) < 24).mean())

        assert inliers(H) >= 0.75, n
        assert inliers(views[(n + 1) % len(views)][1]) <= 0.25    # views overlap: another one's H maps some
        unrelated = features(elsewhere[n][0], f"other{n}.png")
        src, tgt = _mutual_matches(source, unrelated)
        assert float((np.linalg.norm(_mapped(H, source.positions[src]) - unrelated.positions[tgt], axis=1) < 24)
                     .mean()) <= 0.1


def test_a_folder_gallery_trains_self_supervised_by_default():
    from hydra import compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401
    from rrt_dist.pipelines.features import training_pairs

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        folder = compose("config", overrides=["dataset=folder", "dataset.root=x"])
        labelled = compose("config", overrides=["dataset=folder", "dataset.root=x", "train=rrt_gld"])
        synthetic = compose("config", overrides=[])
        selfsup = compose("config", overrides=["train.pairs=selfsup"])
    assert training_pairs(folder) == "selfsup" and folder.train.top_locals == 200    # train=rrt_selfsup
    assert folder.train.global_fusion and not synthetic.train.global_fusion
    assert training_pairs(labelled) == "selfsup"          # any recipe: a folder has no training split
    assert training_pairs(synthetic) == "labels" and training_pairs(selfsup) == "selfsup"


def assert_exact_ranking(found: np.ndarray, expected: np.ndarray, sims: np.ndarray, atol: float = 1e-5) -> None:
    """``found`` is the exact ranking ``expected`` (rows of ``sims``' columns, -1 padding) up to the order of
    neighbours whose similarities differ by float noise: the search and numpy's matmul round differently, and
    views of one photo make near-ties (two such neighbours were seen swapped)."""
    np.testing.assert_array_equal(found == -1, expected == -1)
    valid = expected != -1
    assert all(len(set(row[ok])) == ok.sum() for row, ok in zip(found, valid))      # no neighbour twice

    def similarities(neighbours):
        return np.take_along_axis(sims, np.where(valid, neighbours, 0), axis=1)[valid]
    np.testing.assert_allclose(similarities(found), similarities(expected), rtol=0, atol=atol)
    assert (found == expected).mean() > 0.99


def test_self_supervised_training_on_held_out_photos(local_ray, tmp_path, monkeypatch):
    """Training on the benchmark's train photos (no labels): training rows are those photos and their views only
    (never a query or a query's view), validation holds out whole photos, and the run trains and resumes. The
    driver streams the training table's globals through search (only the held-out rows' are loaded whole), and
    the neighbours equal exact search over the training rows."""
    from hydra import compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401
    from rrt_dist.datasets.photos import write_photo_benchmark
    from rrt_dist.pipelines.train import prepare_training, train_rrt

    meta = write_photo_benchmark(tmp_path / "photos", n_test=8, views=2)
    overrides = ["dataset=folder", f"dataset.root={tmp_path / 'photos'}", f"features_dir={tmp_path / 'features'}",
                 "backbone.options.scales=[1.0]", "backbone.options.global_scales=[1.0]",
                 "backbone.options.max_local=16", "train.top_locals=16", "train.batch_size=4", "train.val_depth=10",
                 f"train.selfsup.images={tmp_path / 'photos' / 'train'}", "train.selfsup.views=3",
                 f"train.selfsup.root={tmp_path / 'views'}", f"train.storage_path={tmp_path / 'runs'}",
                 "train.epochs=2", "train.name=selfsup", "ray.num_cpus=2"]
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides + [f"output_dir={tmp_path / 'out'}"])
    whole_table = FeatureStore.globals

    def restricted_views_only(table, *args, **kwargs):
        assert table.restricted, f"the driver loaded every global descriptor of {table.uri}"
        return whole_table(table, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "globals", restricted_views_only)
    store, rows, val = prepare_training(cfg)
    monkeypatch.undo()
    vectors = store.take_globals(rows["ids"])
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    k = cfg.train.neighbours
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    expected[:, len(rows["ids"]) - 1:] = -1                  # fewer training rows than k: padding
    expected = np.pad(expected, ((0, 0), (0, k - expected.shape[1])), constant_values=-1)
    assert_exact_ranking(rows["neighbours"], expected, sims)
    # through a sharded index of the training rows (not the held-out ones, which would take places): the same
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        sharded = compose("config", overrides=overrides + [f"output_dir={tmp_path / 'out'}", "index.mode=sharded",
                                                           f"index.dir={tmp_path / 'indexes'}", "index.n_shards=2"])
    monkeypatch.setattr(FeatureStore, "globals", restricted_views_only)
    assert_exact_ranking(prepare_training(sharded)[1]["neighbours"], expected, sims)
    monkeypatch.undo()
    sources = {str((tmp_path / "photos" / "train" / f"{n}.png").resolve()) for n in meta["train"]}
    assert set(rows["uris"]) - sources and all(u in sources or "/views/" in u for u in rows["uris"])
    assert not any("query_" in u or "_view" in Path(u).name for u in rows["uris"])
    n_labels = len(np.unique(rows["labels"]))
    assert n_labels == len(meta["train"]) - len(meta["train"]) // 4 and len(rows["ids"]) == 4 * n_labels
    held = val["bench"].gallery.column("id").to_numpy()
    assert len(held) == 4 * (len(meta["train"]) // 4) and not np.isin(held, rows["ids"]).any()
    assert len(rows["anchors"]) == len(rows["ids"])      # every view has its source's other views as positives

    out = train_rrt(cfg, cfg.output_dir)
    assert [h["epoch"] for h in out["history"]] == [1, 2] and all(0 <= h["val_score"] <= 1 for h in out["history"])
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        longer = compose("config", overrides=overrides[:-3] + ["train.epochs=3", "train.name=selfsup", "ray.num_cpus=2",
                                                               f"output_dir={tmp_path / 'out2'}"])
    again = train_rrt(longer, longer.output_dir)
    assert [h["resumed_after"] for h in again["history"]] == [0, 0, 2]


@pytest.mark.parametrize("pairs", ["labels", "mixed"])
def test_labelled_pairs_on_an_unlabelled_gallery_say_to_train_without_labels(tmp_path, pairs):
    from hydra import compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401
    from rrt_dist.datasets.photos import write_photo_benchmark
    from rrt_dist.pipelines.features import training_features

    write_photo_benchmark(tmp_path / "photos", n_test=4, views=1)
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=folder", f"dataset.root={tmp_path / 'photos'}",
                                           f"train.pairs={pairs}", f"features_dir={tmp_path / 'features'}"])
    with pytest.raises(ValueError, match=r"needs a label for every training image.*train.pairs=selfsup"):
        training_features(cfg)
