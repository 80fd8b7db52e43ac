"""Every reader parses fixtures in the official on-disk formats (tests/fixtures/)."""
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from rrt_dist.datasets import (make_manifest, read_cars196, read_cub200, read_folder, read_gldv2_retrieval,
                               read_gldv2_train, read_msls, read_r1m, read_revisitop, read_sop, stable_id)
from rrt_dist.datasets.gldv2 import gldv2_id
from rrt_dist.schema import DatasetLayoutError

FIX = Path(__file__).parent / "fixtures"


def ids(table):
    return table.column("id").to_pylist()


def test_revisitop_reader():
    bench = read_revisitop(FIX / "roxford5k", "roxford5k")
    assert bench.gallery.num_rows == 5 and bench.queries.num_rows == 2
    assert ids(bench.gallery)[0] == stable_id("jpg/all_souls_000001.jpg")
    assert bench.gallery.column("uri")[0].as_py() == str(FIX / "roxford5k" / "jpg" / "all_souls_000001.jpg")
    assert bench.queries.column("bbox").to_pylist()[1] == [25.0, 238.0, 932.0, 762.0]
    assert bench.protocol.gnd[0]["junk"].tolist() == [4]
    # perfect ranking for q0 (easy 0, hard 1), q1 (easy 2): every mAP is 1
    g = ids(bench.gallery)
    ranks = np.array([[g[0], g[1], g[4], g[2], g[3]], [g[2], g[3], g[0], g[1], g[4]]])
    out = bench.evaluate(ranks)
    assert out["medium"]["mAP"] == 1.0 and out["hard"]["mAP"] == 1.0 and out["easy"]["mAP"] == 1.0
    # swapping q0's hard positive behind a negative: medium AP = (1 + (1/2 + 2/3)/2)/2
    ranks[0] = [g[0], g[2], g[1], g[3], g[4]]
    assert bench.evaluate(ranks)["medium"]["mAP"] == pytest.approx(((1 + (0.5 + 2 / 3) / 2) / 2 + 1) / 2)


def test_r1m_distractors_appended_with_stable_ids():
    d_all = read_r1m(FIX / "r1m")
    assert ids(d_all) == [stable_id("revisitop1m/a/b/img0001.jpg"), stable_id("revisitop1m/a/b/img0002.jpg"),
                          stable_id("revisitop1m/c/d/img0003.jpg")]
    assert d_all.column("uri")[2].as_py().endswith("jpg/c/d/img0003.jpg")
    d_two = read_r1m(FIX / "r1m", limit=2)
    assert ids(d_two) == ids(d_all)[:2]
    bench = read_revisitop(FIX / "roxford5k", "roxford5k", distractors=d_all)
    assert bench.gallery.num_rows == 8 and bench.n_distractors == 3
    assert bench.gallery.column("split").to_pylist()[5:] == ["distractor"] * 3
    # distractors ranked first push the positives down but are never positive
    g = ids(bench.gallery)
    ranks = np.array([[g[5], g[0], g[1]], [g[6], g[7], g[2]]])
    out = bench.evaluate(ranks)
    # q0: junk/hard removed -> [d, g0]: hit at 1 -> (0 + 1/2)/2; q1: [d, d, g2]: hit at 2 -> (0 + 1/3)/2
    assert out["easy"]["mAP"] == pytest.approx(((0 + 1 / 2) / 2 + (0 + 1 / 3) / 2) / 2)


def test_revisitop_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"gnd_roxford5k\.pkl: file not found.*Expected layout"):
        read_revisitop(tmp_path, "roxford5k")
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": []}, f)
    with pytest.raises(DatasetLayoutError, match="expected keys imlist, qimlist, gnd"):
        read_revisitop(tmp_path, "roxford5k")
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [3], "hard": [],
                                                                 "junk": []}]}, f)
    with pytest.raises(DatasetLayoutError, match="indexes outside imlist"):
        read_revisitop(tmp_path, "roxford5k")
    with pytest.raises(DatasetLayoutError, match="revisitop1m.txt: file not found"):
        read_r1m(tmp_path)


def test_ground_truth_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with open(tmp_path / "gnd_x.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [Evil()]}, f)
    with pytest.raises(DatasetLayoutError, match=r"refusing to load posix\.system"):
        read_revisitop(tmp_path, "x")


def test_gldv2_retrieval_reader():
    bench = read_gldv2_retrieval(FIX / "gldv2")
    assert bench.queries.num_rows == 3  # the Ignored query is dropped
    assert ids(bench.gallery) == [10, 0xB0, 0xC00, -16]  # 64-bit hex ids as int64 (fff...0 -> -16)
    assert bench.gallery.column("uri")[0].as_py() == str(FIX / "gldv2" / "index/0/0/0/000000000000000a.jpg")
    assert bench.protocol.usage == ["Public", "Private", "Public"]
    g = ids(bench.gallery)
    perfect = np.array([[g[0], g[1], g[2]], [g[3], g[0], g[1]], [g[2], g[0], g[1]]])
    assert bench.evaluate(perfect) == {"mAP@100/public": 1.0, "mAP@100/private": 1.0}
    # query 1 finds only its second relevant image, at rank 2: AP = (1/2)/2
    half = perfect.copy()
    half[0] = [g[3], g[1], g[2]]
    assert bench.evaluate(half)["mAP@100/public"] == pytest.approx((0.25 + 1.0) / 2)


def test_gldv2_ids_and_errors(tmp_path):
    assert gldv2_id("ffffffffffffffff") == -1 and gldv2_id("7fffffffffffffff") == 2**63 - 1
    with pytest.raises(ValueError, match="reserved"):              # -1 pads rankings; no image may have it
        make_manifest([gldv2_id("ffffffffffffffff")], ["x.jpg"], "gallery")
    (tmp_path / "index.csv").write_text("id\nnothex\n")
    with pytest.raises(DatasetLayoutError, match=r"index\.csv: ids must be 16 lowercase hex"):
        read_gldv2_retrieval(tmp_path)
    (tmp_path / "index.csv").write_text("identifier\n000000000000000a\n")
    with pytest.raises(DatasetLayoutError, match=r"missing column\(s\) \['id'\]"):
        read_gldv2_retrieval(tmp_path)


def test_gldv2_training_subset_sampler():
    full = read_gldv2_train(FIX / "gldv2", n_landmarks=None, min_images=3, max_images=None)
    assert sorted(set(full.column("label").to_pylist())) == [1, 7, 9]  # landmark 12 has 1 image
    sub = read_gldv2_train(FIX / "gldv2", n_landmarks=2, min_images=3, max_images=4, seed=0)
    counts = dict(zip(*np.unique(sub.column("label").to_numpy(), return_counts=True)))
    assert len(counts) == 2 and all(c <= 4 for c in counts.values())
    assert set(ids(sub)) <= set(ids(full))
    again = read_gldv2_train(FIX / "gldv2", n_landmarks=2, min_images=3, max_images=4, seed=0)
    assert ids(again) == ids(sub)
    assert sub.column("uri")[0].as_py().startswith(str(FIX / "gldv2" / "train"))
    with pytest.raises(ValueError, match="only 3 landmarks"):
        read_gldv2_train(FIX / "gldv2", n_landmarks=5, min_images=3)


def test_msls_reader_positives_within_25m_without_panoramas():
    bench = read_msls(FIX / "msls", cities=["cph"])
    assert bench.queries.num_rows == 2 and bench.gallery.num_rows == 4  # qP and d3 are panoramas
    assert [p.tolist() for p in bench.protocol.positives] == [[0, 1], [2]]  # d1 (10 m), d2 (24.9 m); d4 (20 m)
    assert bench.queries.column("gps")[0].as_py() == [55.6761, 12.5683]
    assert bench.queries.column("utm")[1].as_py() == [724500.0, 6176500.0]
    assert ids(bench.queries)[0] == stable_id("train_val/cph/query/images/qA.jpg")
    g = ids(bench.gallery)
    out = bench.evaluate(np.array([[g[3], g[1], g[0]], [g[0], g[1], g[2]]]))
    assert out["R@1"] == 0.0 and out["R@5"] == 1.0
    w2s = read_msls(FIX / "msls", cities=["cph"], subtask="w2s")
    assert w2s.queries.num_rows == 1 and w2s.gallery.num_rows == 3
    with pytest.raises(DatasetLayoutError, match="train_val/sf: city folder not found"):
        read_msls(FIX / "msls", cities=["sf"])


def test_sop_reader_leave_one_out():
    bench = read_sop(FIX / "sop")
    assert bench.exclude_self and bench.gallery.num_rows == 5
    assert bench.queries.column("label").to_pylist() == [11319, 11319, 11320, 11320, 11321]
    g = ids(bench.gallery)
    # rankings include the query itself first, as a raw index search returns them
    ranks = np.array([[g[0], g[1], g[2], g[3], g[4]], [g[1], g[0], g[2], g[3], g[4]], [g[2], g[3], g[0], g[1], g[4]],
                      [g[3], g[0], g[2], g[1], g[4]], [g[4], g[0], g[1], g[2], g[3]]])
    out = bench.evaluate(ranks)
    # R@1: q0, q1, q2 hit; q3's first other is g0 (miss); q4 is alone (miss)
    assert out["R@1"] == pytest.approx(3 / 5)
    # over the 4 queries with a same-label image (R = 1): three hit at rank 1, q3 at rank 2
    assert out["P@1"] == pytest.approx(3 / 4) and out["MAP@R"] == pytest.approx(3 / 4)
    assert out["RP"] == pytest.approx(3 / 4) and out["R@10"] == pytest.approx(4 / 5)
    assert read_sop(FIX / "sop", "train").gallery.num_rows == 2


def test_cub200_and_cars196_class_splits():
    cub = read_cub200(FIX / "cub200")
    assert cub.gallery.column("label").to_pylist() == [101, 101, 200]
    assert cub.gallery.column("uri")[0].as_py() == str(FIX / "cub200/images/101.White_Pelican/White_Pelican_0025_97604.jpg")
    assert read_cub200(FIX / "cub200", "train").gallery.column("label").to_pylist() == [1, 1, 100]
    cars = read_cars196(FIX / "cars196")
    assert cars.gallery.column("label").to_pylist() == [99, 196, 196]
    assert cars.gallery.column("uri")[0].as_py() == str(FIX / "cars196/car_ims/008146.jpg")
    assert read_cars196(FIX / "cars196", "train").gallery.num_rows == 3
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat: file not found"):
        read_cars196(FIX)


def test_folder_reader_positives_and_leave_one_out():
    bench = read_folder(FIX / "folder")
    assert bench.queries.num_rows == 2 and not bench.exclude_self
    assert [p.tolist() for p in bench.protocol.positives] == [[0, 1], [2]]
    g = ids(bench.gallery)
    out = bench.evaluate(np.array([[g[0], g[2], g[1]], [g[2], g[0], g[1]]]))
    # qa: positives at 0 and 2 -> (1 + (1/2 + 2/3)/2)/2; qb: at 0 -> 1
    assert out["mAP"] == pytest.approx(((1 + (1 / 2 + 2 / 3) / 2) / 2 + 1) / 2)
    assert out["R@1"] == 1.0
    loo = read_folder(FIX / "folder_loo")
    assert loo.exclude_self and [p.tolist() for p in loo.protocol.positives] == [[1], [0], [], []]


def test_folder_reader_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"gallery\.csv: file not found"):
        read_folder(tmp_path)
    (tmp_path / "gallery.csv").write_text("path\na.jpg\n")
    with pytest.raises(DatasetLayoutError, match="needs a label column"):
        read_folder(tmp_path)
    (tmp_path / "queries.csv").write_text("path,positives\nq.jpg,missing.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"positives \['missing.jpg'\] are not in gallery.csv"):
        read_folder(tmp_path)


@pytest.mark.parametrize("rows, message", [
    ("a.jpg,1\nb.jpg,\nc.jpg,2\n", "gallery.csv: line 3, column label: '' is not an integer (empty)"),
    ("a.jpg,1\nb.jpg,x\n", "gallery.csv: line 3, column label: 'x' is not an integer"),
    ("a.jpg,1\nb.jpg,1\na.jpg,2\n", "gallery.csv: path 'a.jpg' is listed twice (lines 2 and 4)"),
])
def test_a_bad_gallery_csv_names_the_file_line_and_column(tmp_path, rows, message):
    (tmp_path / "gallery.csv").write_text("path,label\n" + rows)
    with pytest.raises(DatasetLayoutError, match=re.escape(message)):
        read_folder(tmp_path)


@pytest.mark.parametrize("rows, message", [
    ("uri,id\na.jpg,1\nb.jpg,9223372036854775808\n",
     "m.csv: line 3, column id: 9223372036854775808 is outside the 64-bit signed integers"),
    ("uri,id\na.jpg,-9223372036854775809\n", "m.csv: line 2, column id: -9223372036854775809 is outside"),
    ("uri,id\na.jpg,1\nb.jpg,-1\n", "m.csv: line 3, column id: -1 is reserved"),
    ("uri,id\na.jpg,7\nb.jpg,8\nc.jpg,7\n", "m.csv: id 7 is listed twice (lines 2 and 4)"),
    ("uri,id\na.jpg,1\n ,2\n", "m.csv: line 3, column uri: empty"),
    ('uri,id\na.jpg,1\n"b.jpg,2\n', "m.csv: cannot be read (Error tokenizing data"),
])
def test_a_bad_manifest_is_one_line_naming_file_line_and_column(tmp_path, rows, message):
    from rrt_dist.datasets.image_list import new_images

    (tmp_path / "m.csv").write_text(rows)
    with pytest.raises(DatasetLayoutError, match=re.escape(message)):
        new_images(manifest=str(tmp_path / "m.csv"))


def test_a_symlink_loop_or_a_folder_is_a_row_recorded_as_unreadable(tmp_path):
    """A symlink loop in a folder of images or a manifest keeps its row (absolute, unresolved), and so does a
    folder listed as an image: each is one row's recorded reason when read, never the job's traceback."""
    from rrt_dist.datasets.image_list import new_images
    from rrt_dist.features.images import ImageError, load_image

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").symlink_to("b.jpg")
    (images / "b.jpg").symlink_to("a.jpg")
    (images / "album.jpg").mkdir()
    (tmp_path / "m.csv").write_text("uri\nimages/a.jpg\nimages/album.jpg\n")
    from_folder = new_images(images=str(images)).column("uri").to_pylist()
    from_manifest = new_images(manifest=str(tmp_path / "m.csv")).column("uri").to_pylist()
    assert str(images / "a.jpg") in from_folder and from_manifest == [str(images / "a.jpg"), str(images / "album.jpg")]
    for uri, reason in zip(from_manifest, ("Too many levels of symbolic links", "Is a directory")):
        with pytest.raises(ImageError, match=reason):     # what extraction records as the row's reason
            load_image(uri)
