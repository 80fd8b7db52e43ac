"""The Ray Data extraction pipeline on local Ray: equal to in-process extraction, resumable, error-tolerant."""
import numpy as np
import pytest

from rrt_dist.datasets import concat_manifests, make_manifest, read_r1m, read_revisitop
from rrt_dist.features import create_extractor, create_preparer
from rrt_dist.features.core import extract_rows
from rrt_dist.pipelines.extract import InjectedFailure, extract_to_lance
from rrt_dist.schema import ExtractSettings, FeatureTableMismatch
from rrt_dist.store import FeatureStore, committed_ids

OPTIONS = dict(model="tf_efficientnet_lite0", mean=[0.5] * 3, std=[0.5] * 3, scales=[0.7071, 1.0],
               global_scales=[1.0], max_size=192, max_local=40)


@pytest.fixture(scope="module")
def manifest(small_synthetic):
    _, root = small_synthetic
    bench = read_revisitop(root, "synthetic", read_r1m(root / "distractors", limit=8))
    return concat_manifests([bench.gallery.slice(0, 24), bench.gallery.slice(bench.gallery.num_rows - 8),
                             bench.queries.slice(0, 6)])   # gallery, distractors and bbox-cropped queries


def test_pipeline_equals_in_process_extraction(local_ray, manifest, tmp_path):
    summary = extract_to_lance(manifest, tmp_path / "f.lance", "multiscale-cnn", OPTIONS,
                               ExtractSettings(batch_size=4, commit_every=8))
    assert summary.extracted == manifest.num_rows and summary.errors == 0
    store = FeatureStore(tmp_path / "f.lance")
    ids = manifest.column("id").to_pylist()
    assert sorted(store.ids.tolist()) == sorted(ids)

    ref_ids, ref, errors = extract_rows(create_extractor("multiscale-cnn", **OPTIONS),
                                        create_preparer("multiscale-cnn", **OPTIONS),
                                        manifest.select(["id", "uri", "bbox"]).to_pylist())
    assert ref_ids == ids and not errors
    got = store.take_locals(ids)
    table_ids, table_globals = store.globals()
    row = {i: k for k, i in enumerate(table_ids.tolist())}
    for k, f in enumerate(ref):
        np.testing.assert_allclose(table_globals[row[ids[k]]], f.global_, atol=2e-3)     # fp16 storage
        n = f.n_local
        assert got["n_local"][k] == n and not got["mask"][k, :n].any() and got["mask"][k, n:].all()
        np.testing.assert_allclose(got["local"][k, :n], f.local, atol=2e-3)
        np.testing.assert_allclose(got["positions"][k, :n], f.positions, rtol=1e-6)
        np.testing.assert_array_equal(got["scales"][k, :n], f.scales)
    with pytest.raises(KeyError, match="not in"):
        store.take_locals([123456789])


def test_rerun_after_a_crash_extracts_each_id_once(local_ray, manifest, tmp_path):
    uri = tmp_path / "f.lance"
    settings = ExtractSettings(batch_size=4, commit_every=8, stop_after_commits=2)
    with pytest.raises(InjectedFailure):
        extract_to_lance(manifest, uri, "multiscale-cnn", OPTIONS, settings)
    partial = committed_ids(uri)
    assert 8 <= len(partial) < manifest.num_rows and len(np.unique(partial)) == len(partial)
    summary = extract_to_lance(manifest, uri, "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=4))
    assert summary.skipped == len(partial) and summary.extracted == manifest.num_rows - len(partial)
    final = committed_ids(uri)
    assert sorted(final.tolist()) == sorted(manifest.column("id").to_pylist())   # every id exactly once
    again = extract_to_lance(manifest, uri, "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=4))
    assert again.extracted == 0 and again.skipped == manifest.num_rows


def test_a_full_device_ends_in_one_error_naming_the_table(local_ray, manifest, tmp_path, monkeypatch):
    """ENOSPC while committing (or inside a Ray task, where Lance reports it as text under Ray's retry advice)
    becomes StorageFull naming the table, a user error (one line, exit 2); nothing committed is lost."""
    import errno

    import rrt_dist.pipelines.extract as extract
    from rrt_dist.schema import USER_ERRORS, StorageFull, is_disk_full

    uri = tmp_path / "f.lance"
    extract_to_lance(manifest.slice(0, 4), uri, "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=4))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(extract, "commit_fragments", full)
    with pytest.raises(StorageFull, match=f"no space left on the device of {uri}"):
        extract_to_lance(manifest.slice(0, 8), uri, "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=4))
    assert sorted(committed_ids(uri).tolist()) == sorted(manifest.slice(0, 4).column("id").to_pylist())
    assert issubclass(StorageFull, USER_ERRORS)
    try:                                   # as a Ray task error carries it: text, chained under another error
        try:
            raise RuntimeError("LanceError(IO): Generic LocalFileSystem error: No space left on device (os error 28)")
        except RuntimeError as inner:
            raise ValueError("task failed; if you believe this to be transient, retry") from inner
    except ValueError as wrapped:
        assert is_disk_full(wrapped) and not is_disk_full(ValueError("no space for that key"))


def test_corrupt_and_missing_images_are_recorded_not_fatal(local_ray, manifest, tmp_path):
    good = manifest.slice(0, 5)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good.column("uri")[0].as_py(), "rb").read()[:400])
    bad = make_manifest([901, 902], [str(truncated), str(tmp_path / "missing.jpg")], "gallery")
    rows = concat_manifests([good, bad])
    uri = tmp_path / "f.lance"
    summary = extract_to_lance(rows, uri, "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=3))
    assert summary.extracted == 5 and summary.errors == 2
    import lance

    errors = lance.dataset(str(tmp_path / "f-errors.lance")).to_table().to_pylist()
    reasons = {e["id"]: e["reason"] for e in errors}
    assert set(reasons) == {901, 902} and "truncated.jpg" in reasons[901] and "missing.jpg" in reasons[902]
    assert sorted(committed_ids(uri).tolist()) == sorted(good.column("id").to_pylist())
    rerun = extract_to_lance(rows, uri, "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=3))
    assert rerun.extracted == 0 and rerun.skipped == 7            # recorded errors are not retried ...
    retry = extract_to_lance(rows, uri, "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=3, retry_errors=True))
    assert retry.errors == 2 and retry.extracted == 0             # ... unless asked


def test_table_of_another_extractor_is_refused(local_ray, manifest, tmp_path):
    uri = tmp_path / "f.lance"
    extract_to_lance(manifest.slice(0, 2), uri, "multiscale-cnn", OPTIONS, ExtractSettings(batch_size=2))
    with pytest.raises(FeatureTableMismatch, match="fingerprint"):
        extract_to_lance(manifest.slice(2, 2), uri, "multiscale-cnn", {**OPTIONS, "max_local": 10},
                         ExtractSettings(batch_size=2))


def test_int8_locals_round_trip_within_half_a_step():
    from rrt_dist.store.features import decode_int8, encode_int8

    rng = np.random.default_rng(0)
    local = rng.normal(size=(5, 40, 128)).astype(np.float32)
    local[0, 3] = 0.0                                              # an all-zero (padding) descriptor
    codes, scale = encode_int8(local)
    assert codes.dtype == np.int8 and scale.shape == (5, 40) and scale[0, 3] == 0
    error = np.abs(decode_int8(codes, scale) - local)
    assert (error <= scale[..., None] / 2 + 1e-7).all() and (decode_int8(codes, scale)[0, 3] == 0).all()
    assert np.abs(codes).max() == 127                              # each descriptor uses the whole range


def test_compact_local_storage_shrinks_the_table_and_decodes_on_read(local_ray, manifest, tmp_path):
    """backbone.local_storage: the same extraction, locals as int8 + one scale each (about half the bytes on
    disk) or as PQ codes (16 bytes a descriptor, codebook trained on a sample and kept in the table), read back
    as float32: int8 within half a quantisation step of the fp16 table's, PQ equal to FAISS's own decoding of
    the fp16 locals' codes; globals unchanged, padding zero."""
    from pathlib import Path

    import faiss

    from rrt_dist.store.features import codebook_uri, local_encoding

    sizes = {}
    stores = {}
    for encoding in ("fp16", "int8", "pq"):
        uri = tmp_path / f"{encoding}.lance"
        extract_to_lance(manifest, uri, "multiscale-cnn", OPTIONS,
                         ExtractSettings(batch_size=8, local_storage=encoding, local_pq_m=16, local_pq_sample=20))
        stores[encoding] = FeatureStore(uri)
        sizes[encoding] = sum(p.stat().st_size for p in Path(uri).rglob("*.lance"))
        assert local_encoding(stores[encoding].dataset.schema) == encoding
    assert sizes["int8"] < 0.6 * sizes["fp16"] and sizes["pq"] < 0.25 * sizes["fp16"]
    assert (tmp_path / "pq-pq-sample.lance").is_dir()             # the images the codebook was trained on
    assert Path(codebook_uri(tmp_path / "pq.lance")).is_file()
    ids = manifest.column("id").to_pylist()
    full, small = stores["fp16"].take_locals(ids), stores["int8"].take_locals(ids)
    assert small["local"].dtype == np.float32
    np.testing.assert_array_equal(small["global"], full["global"])
    np.testing.assert_array_equal(small["n_local"], full["n_local"])
    step = np.abs(full["local"]).max(axis=-1, keepdims=True) / 127
    assert (np.abs(small["local"] - full["local"]) <= step / 2 + 2e-3).all()   # + the fp16 rounding of the other
    codebook = stores["pq"].codebook
    assert codebook.shape == (16, 256, 8)
    pq = faiss.ProductQuantizer(128, 16, 8)                       # FAISS itself, from the stored centroids
    faiss.copy_array_to_vector(codebook.reshape(-1), pq.centroids)
    coded = stores["pq"].take_locals(ids)
    valid = ~full["mask"]
    expected = pq.decode(pq.compute_codes(np.ascontiguousarray(full["local"][valid])))
    # the table coded float32 outputs, this recodes their fp16 copies: a sub-vector on a cell border may flip
    same = np.abs(coded["local"][valid] - expected).reshape(-1, 16, 8).max(axis=-1) < 1e-6
    assert same.mean() > 0.98
    assert (coded["local"][~valid] == 0).all() and np.array_equal(coded["global"], full["global"])
    rel = np.linalg.norm(coded["local"][valid] - full["local"][valid], axis=1) / np.linalg.norm(full["local"][valid], axis=1)
    assert np.median(rel) < 0.5                                   # a coarse but faithful approximation
    with pytest.raises(FeatureTableMismatch, match="stores local descriptors as fp16"):
        extract_to_lance(manifest, tmp_path / "fp16.lance", "multiscale-cnn", OPTIONS,
                         ExtractSettings(batch_size=8, local_storage="int8"))


def test_a_uri_names_its_tables_wherever_the_job_runs(tmp_path, monkeypatch):
    """Table folders are keyed by where images come from: a URI as written, never folded into a path under the
    working directory (two runs from two folders would extract the same bucket twice)."""
    from rrt_dist.pipelines.features import absolute_location, source_key

    keys = set()
    for cwd in (tmp_path, tmp_path.parent):
        monkeypatch.chdir(cwd)
        keys.add(source_key("s3://bucket/roxford5k"))
        assert absolute_location("s3://bucket/roxford5k") == "s3://bucket/roxford5k"
    assert len(keys) == 1
    monkeypatch.chdir(tmp_path)
    assert absolute_location("data") == str(tmp_path / "data")
