"""The RRT paper from its released artefacts: `rrt-dist import` reads DELG files laid out as the release lays them
out into the tables `evaluate` reads, and `experiment=rrt_paper_roxford` evaluates them with a checkpoint of the
released layout. The fixture's globals are built so that the global-only mAP is known by hand."""
import pickle

import numpy as np
import pytest
import torch

from rrt_dist.features.delg import DELG_FILE_SCALES, encode_datum, encode_delf_features
from rrt_dist.models.rrt import RerankingTransformer
from rrt_dist.schema import ConfigError

RELEASE = "r50_gldv2"
QUERIES = ["all_souls_000013", "ashmolean_000058"]
GALLERY = [f"gallery_{i}" for i in range(8)]
DISTRACTORS = [f"d{i}" for i in range(5)]
# cosine of each gallery / distractor image to (query 0, query 1)
GALLERY_COS = [(0.9, 0), (0.7, 0), (0.1, 0.9), (0, 0.5), (0.8, 0), (0.2, 0.2), (0.1, 0.1), (0.05, 0.3)]
DISTRACTOR_COS = [(0.85, 0), (0.3, 0.1), (0.2, 0.2), (0.1, 0.05)]       # d4 has no files
GND = [{"bbx": [10.0, 10.0, 200.0, 200.0], "easy": [0], "hard": [1], "junk": [4]},
       {"bbx": [5.0, 5.0, 100.0, 100.0], "easy": [2], "hard": [], "junk": [3]}]


def _write_pair(folder, name, cos, axis, rng):
    """A .delg_global with the given cosines to the two query axes (0 and 1; a unique residual axis makes it
    unit length) and a .delg_local of 20 random locals."""
    vector = np.zeros(2048)
    vector[:2] = cos
    vector[axis] = np.sqrt(1 - np.sum(np.square(cos)))
    (folder / f"{name}.delg_global").write_bytes(encode_datum(vector))
    n = 20
    (folder / f"{name}.delg_local").write_bytes(encode_delf_features(
        rng.uniform(0, 500, (n, 2)).astype(np.float32), DELG_FILE_SCALES[rng.integers(0, 7, n)].astype(np.float32),
        rng.normal(size=(n, 128)).astype(np.float32), rng.uniform(0, 3, n).astype(np.float32)))


@pytest.fixture
def released(tmp_path):
    """ROxf-like and R1M-like roots holding only the ground truth, the lists and the released files (no images),
    and a random RRT saved in the released checkpoint layout."""
    rng = np.random.default_rng(0)
    root, r1m = tmp_path / "roxford5k", tmp_path / "revisitop1m"
    for folder in (root / f"delg_{RELEASE}", r1m / f"delg_{RELEASE}"):
        folder.mkdir(parents=True)
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": GALLERY, "qimlist": QUERIES, "gnd": GND}, f)
    for q, name in enumerate(QUERIES):
        _write_pair(root / f"delg_{RELEASE}", name, (1.0, 0.0) if q == 0 else (0.0, 1.0), 2 + q, rng)
    for i, (name, cos) in enumerate(zip(GALLERY, GALLERY_COS)):
        _write_pair(root / f"delg_{RELEASE}", name, cos, 10 + i, rng)
    for i, (name, cos) in enumerate(zip(DISTRACTORS, DISTRACTOR_COS)):
        _write_pair(r1m / f"delg_{RELEASE}", name, cos, 100 + i, rng)
    (r1m / "revisitop1m.txt").write_text("".join(f"{n}.jpg\n" for n in DISTRACTORS))
    torch.manual_seed(0)
    model = RerankingTransformer()
    torch.save({"state": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "r50_gldv2.pt")
    return {"root": root, "r1m": r1m, "checkpoint": tmp_path / "r50_gldv2.pt", "features": tmp_path / "features"}


def test_import_then_evaluate_the_paper_rows_from_released_files(run_job, released, tmp_path):
    common = ["experiment=rrt_paper_roxford", f"dataset.root={released['root']}", "dataset/distractors=r1m",
              f"dataset.distractors.root={released['r1m']}", f"features_dir={released['features']}"]
    tables = run_job("import", common, tmp_path / "import")
    assert {n: (t["rows"], t["missing"]) for n, t in tables.items()} == {
        "query": (2, 0), "gallery": (8, 0), "distractor": (4, 1)}
    again = run_job("import", common, tmp_path / "import-again")                 # resumable: nothing read twice
    assert {n: t["version"] for n, t in again.items()} == {n: t["version"] for n, t in tables.items()}

    with pytest.raises(ConfigError, match="delg_released"):                   # import reads files, never images
        run_job("import", [*common, "backbone=lite0_multiscale"], tmp_path / "import-images")

    report = run_job("evaluate", [*common, f"reranker.checkpoint={released['checkpoint']}"], tmp_path / "eval")
    rows = report["results"]
    # Query 0 ranks g0 .9, d0 .85, g4 .8 (junk), g1 .7: Medium keeps g0, d0, g1 -> positives at ranks 1 and 3,
    # AP = (1 + 1) / 2 * 1/2 + (1/2 + 2/3) / 2 * 1/2 = 0.79167; Hard (g0 junk too) keeps d0, g1 -> AP = 1/2 * 1/2 =
    # 0.25. Query 1: g2 first, AP 1; it has no hard positive, so Hard averages query 0 alone.
    with_r1m = rows["Global only"]["roxford5k+5"]
    assert with_r1m["medium"]["mAP"] == pytest.approx((0.791667 + 1) / 2, abs=1e-5)
    assert with_r1m["hard"]["mAP"] == pytest.approx(0.25, abs=1e-6)
    assert rows["Global only"]["roxford5k"]["medium"]["mAP"] == 1.0 == rows["Global only"]["roxford5k"]["hard"]["mAP"]
    rrt = rows["RRT (top-12)"]["roxford5k+5"]              # the top-100 of 12 images with descriptors: all of them
    assert 0 <= rrt["medium"]["mAP"] <= 1 and 0 <= rrt["hard"]["mAP"] <= 1
    assert report["config"]["backbone"]["name"] == "delg-import"
