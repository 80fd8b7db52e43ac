"""What a hostile but fair user does: stale tables, kills before the first commit, decompression bombs, planted
checkpoints, bad values, bad paths, images fixed after a failure, and kill -9 at random commit boundaries."""
import json
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lance
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import rrt_dist.config  # noqa: F401
from rrt_dist.config import validate_config
from rrt_dist.datasets import make_manifest, read_revisitop
from rrt_dist.pipelines.extract import InjectedFailure, extract_to_lance
from rrt_dist.schema import ConfigError, ExtractSettings
from rrt_dist.store import FeatureStore, committed_ids, write_fragment
from rrt_dist.store.features import features_schema, features_to_table

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ("tiny-image", {})


def make(overrides=()):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def folder_dataset(root: Path, images: list[Path], labels: list[int], queries: list[tuple[Path, int]]) -> Path:
    """A folder benchmark with fixed file names (g<i>.jpg, q<i>.jpg) holding the given images."""
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        shutil.copyfile(image, root / f"g{i}.jpg")
    for i, (image, _) in enumerate(queries):
        shutil.copyfile(image, root / f"q{i}.jpg")
    (root / "gallery.csv").write_text("path,label\n" + "".join(f"g{i}.jpg,{lab}\n" for i, lab in enumerate(labels)))
    (root / "queries.csv").write_text("path,label\n" + "".join(f"q{i}.jpg,{lab}\n" for i, (_, lab) in enumerate(queries)))
    return root


@pytest.fixture(scope="module")
def two_folders(small_synthetic, tmp_path_factory):
    """Two folder datasets with the same file names and labels but other pixels (other landmarks)."""
    _, root = small_synthetic
    jpg = root / "jpg" / "test"
    tmp = tmp_path_factory.mktemp("folders")

    def build(name, landmarks):
        images = [jpg / f"g{lm:05d}_{v:02d}.jpg" for lm in landmarks for v in range(4)]
        labels = [i for i, _ in enumerate(landmarks) for _ in range(4)]
        queries = [(jpg / f"q{lm:05d}_0.jpg", i) for i, lm in enumerate(landmarks)]
        return folder_dataset(tmp / name, images, labels, queries)

    return build("a", [0, 1, 2, 3, 4]), build("b", [5, 6, 7, 8, 9])


def run_evaluation(root: Path, features: Path, out: Path, extra=()):
    from rrt_dist.pipelines.evaluate import evaluate

    cfg = make(["dataset=folder", f"dataset.root={root}", "backbone=tiny_image", "reranker=none",
                f"features_dir={features}", f"index.dir={features.parent / 'indexes'}", f"output_dir={out}", *extra])
    validate_config(cfg)
    return evaluate(cfg)


# ------------------------------------------------------------------------------------------------ 1. stale tables

def test_same_file_names_other_pixels_never_reuse_descriptors(local_ray, two_folders, tmp_path):
    a, b = two_folders
    shared = tmp_path / "shared"
    first = run_evaluation(a, shared, tmp_path / "o1")
    second = run_evaluation(b, shared, tmp_path / "o2")                   # today: reused a's descriptors
    alone = run_evaluation(b, tmp_path / "alone", tmp_path / "o3")
    assert second["results"] == alone["results"] and first["results"] != second["results"]
    assert second["run"]["queries"] == 5 and second["run"]["gallery"] == 20
    # with an index too (index.mode=sharded): two datasets of one benchmark type never share one
    indexed = run_evaluation(b, shared, tmp_path / "o4", ["index.mode=sharded", "index.neighbours=10", "reranker.depth=10"])
    fresh = run_evaluation(b, tmp_path / "alone2", tmp_path / "o5", ["index.mode=sharded", "index.neighbours=10", "reranker.depth=10"])
    assert indexed["results"] == fresh["results"]


def test_images_replaced_in_place_are_extracted_again(local_ray, two_folders, tmp_path):
    a, b = two_folders
    root = tmp_path / "data"
    shutil.copytree(b, root)
    features = tmp_path / "features"
    run_evaluation(root, features, tmp_path / "o1", ["index.mode=sharded", "index.neighbours=10", "reranker.depth=10"])
    for f in a.iterdir():                                 # same names, a's pixels and labels, new mtimes
        shutil.copyfile(f, root / f.name)
    replaced = run_evaluation(root, features, tmp_path / "o2", ["index.mode=sharded", "index.neighbours=10", "reranker.depth=10"])
    reference = run_evaluation(a, tmp_path / "fresh", tmp_path / "o3", ["index.mode=sharded", "index.neighbours=10", "reranker.depth=10"])
    assert replaced["results"] == reference["results"]
    gallery = FeatureStore(replaced["feature_tables"]["gallery"]["uri"])
    assert len(gallery) == 20 and len(np.unique(gallery.ids)) == 20


# ------------------------------------------------------------------------------- 2. killed before the first commit

def test_folder_without_a_committed_version_is_no_table(local_ray, small_synthetic, tmp_path):
    _, root = small_synthetic
    bench = read_revisitop(root, "synthetic")
    manifest = bench.gallery.slice(0, 10)
    uri = tmp_path / "gallery.lance"
    with pytest.raises(InjectedFailure):                   # fragments written, never committed
        extract_to_lance(manifest, uri, *TINY, ExtractSettings(batch_size=2, commit_every=4, stop_after_commits=0))
    assert (uri / "data").is_dir() and not (uri / "_versions").exists()
    summary = extract_to_lance(manifest, uri, *TINY, ExtractSettings(batch_size=2))
    assert summary.extracted == 10 and sorted(committed_ids(uri)) == sorted(manifest.column("id").to_pylist())
    # fragments runs wrote but never committed (the stopped one's, a stray one) go once past the grace period
    assert write_fragment(uri, lance.dataset(str(uri)).to_table().slice(0, 2))
    age(uri / "data", hours=2)
    again = extract_to_lance(manifest, uri, *TINY, ExtractSettings(batch_size=2))
    committed = {Path(f.path).name for fr in lance.dataset(str(uri)).get_fragments() for f in fr.data_files()}
    assert again.extracted == 0 and {p.name for p in (uri / "data").iterdir()} == committed


def age(folder: Path, hours: float) -> None:
    """Set back the modification time of every file in ``folder``."""
    import os
    import time

    for f in folder.iterdir():
        os.utime(f, (time.time() - hours * 3600,) * 2)


def small_rows(schema, ids):
    return features_to_table(schema, np.asarray(ids), np.eye(4, dtype=np.float32)[np.asarray(ids) % 4],
                             np.zeros((len(ids), 0, 0)), None, None, np.zeros(len(ids)))


def test_uncommitted_files_go_once_past_the_grace_period_and_no_folder_is_removed(tmp_path):
    """On a URI (file:// here, as s3:// goes through the same fsspec and Lance calls): fragments written and never
    committed are kept while younger than the grace period (another writer may be about to commit them), then
    removed; the table keeps its rows; a folder never committed keeps its folder, its files go by the same rule."""
    from rrt_dist.store import commit_fragments, remove_uncommitted

    schema = features_schema(4, 0, 0, "test", {}, "fp-test")
    uri = f"file://{tmp_path / 't.lance'}"
    data = tmp_path / "t.lance" / "data"
    commit_fragments(uri, schema, write_fragment(uri, small_rows(schema, [0, 1, 2])))
    assert remove_uncommitted(uri) is None                                  # nothing stray
    write_fragment(uri, small_rows(schema, [3, 4]))                         # written, not committed (yet?)
    assert remove_uncommitted(uri) is None and len(list(data.iterdir())) == 2
    age(data, hours=2)
    assert "removed 1 uncommitted fragment file(s)" in remove_uncommitted(uri)
    assert len(list(data.iterdir())) == 1 and sorted(committed_ids(uri)) == [0, 1, 2]
    never = f"file://{tmp_path / 'never.lance'}"
    write_fragment(never, small_rows(schema, [5]))
    assert remove_uncommitted(never) is None and len(list((tmp_path / "never.lance" / "data").iterdir())) == 1
    age(tmp_path / "never.lance" / "data", hours=2)
    assert "no version committed yet" in remove_uncommitted(never)
    assert (tmp_path / "never.lance").is_dir() and not list((tmp_path / "never.lance" / "data").iterdir())


def test_a_first_commit_never_replaces_another_writers(tmp_path, monkeypatch):
    """Two writers of a new table without a lock (an object store): the second one's first commit, prepared when
    it saw no table, finds the first one's committed and replaces nothing; an extraction then appends after
    checking its ids against the other's."""
    import sys

    from rrt_dist.store import commit_fragments

    schema = features_schema(4, 0, 0, "test", {}, "fp-test")
    uri = str(tmp_path / "t.lance")
    theirs, mine = write_fragment(uri, small_rows(schema, [0, 1])), write_fragment(uri, small_rows(schema, [2, 3]))
    commit_fragments(uri, schema, theirs)
    # the moment between the second writer's look (no table yet) and its commit
    monkeypatch.setattr(sys.modules[commit_fragments.__module__], "open_table", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="created by another writer while this one wrote its first commit"):
        commit_fragments(uri, schema, mine)
    monkeypatch.undo()
    assert sorted(committed_ids(uri)) == [0, 1]
    commit_fragments(uri, schema, mine)
    assert sorted(committed_ids(uri)) == [0, 1, 2, 3]


def test_old_versions_go_after_a_compaction_and_the_table_stays_its_size(tmp_path):
    """70 commits, then the end of a run (compaction, versions beyond the last 3 removed, as extraction does):
    the folder holds about the newest version's bytes (not every pre-compaction fragment too); its rows read."""
    from rrt_dist.store import commit_fragments
    from rrt_dist.store.cleanup import remove_old_versions
    from rrt_dist.store.versions import compact

    schema = features_schema(4, 0, 0, "test", {}, "fp-test")
    uri = tmp_path / "t.lance"
    for i in range(70):
        commit_fragments(uri, schema, write_fragment(uri, small_rows(schema, range(10 * i, 10 * i + 10))))

    def on_disk():
        return sum(f.stat().st_size for f in (uri / "data").iterdir())

    def newest():
        return sum(f.file_size_bytes for fr in lance.dataset(str(uri)).get_fragments() for f in fr.data_files())

    assert compact(uri) and on_disk() > 1.9 * newest()       # both copies while the version before it is kept
    for i in range(70, 73):
        commit_fragments(uri, schema, write_fragment(uri, small_rows(schema, range(10 * i, 10 * i + 10))))
    assert "removed" in remove_old_versions(uri, keep=3)
    assert on_disk() <= 1.2 * newest() and sorted(committed_ids(uri)) == list(range(730))


def test_a_lock_on_a_mount_that_does_not_share_locks_is_named_once(tmp_path, monkeypatch, caplog):
    """flock succeeds on NFS mounted nolock or local_lock=flock and on FUSE mounts, but keeps out no writer on
    another machine: the writer lock names the mount and what to do, once a mount; a local disk says nothing."""
    from rrt_dist.store import locks

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw,relatime 0 0\n"
                      f"server:/export {tmp_path / 'nfs'} nfs4 rw,vers=4.2,local_lock=flock,addr=10.0.0.2 0 0\n"
                      f"bucket {tmp_path / 'fuse'} fuse.gcsfuse rw,nosuid,nodev 0 0\n"
                      f"server:/old {tmp_path / 'v3'} nfs rw,vers=3,nolock 0 0\n"
                      f"server:/fine {tmp_path / 'shared'} nfs4 rw,vers=4.2,local_lock=none 0 0\n")
    monkeypatch.setattr(locks, "MOUNTS", str(mounts))
    monkeypatch.setattr(locks, "_warned", set())
    for where in ("nfs", "nfs", "fuse", "v3", "shared", "local"):
        with locks.writer_lock(str(tmp_path / where / "gallery" / "ingest"), f"gallery {where}"):
            pass
    warnings = [r.getMessage() for r in caplog.records if "is not kept out" in r.getMessage()]
    assert len(warnings) == 3, warnings
    assert f"on {tmp_path / 'nfs'}, nfs4 mounted local_lock=flock" in warnings[0]
    assert "a FUSE mount (fuse.gcsfuse)" in warnings[1] and "nfs mounted nolock" in warnings[2]
    assert all("run one writer at a time there" in w for w in warnings)


# --------------------------------------------------------------------------------------- 3. decompression bombs

def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A small PNG whose header claims side x side pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_recorded_not_fatal(local_ray, small_synthetic, tmp_path):
    from rrt_dist.features.images import ImageError, load_image

    _, root = small_synthetic
    bomb = bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="exceed the limit"):
        load_image(str(bomb))
    good = read_revisitop(root, "synthetic").gallery.slice(0, 3)
    rows = pa_concat(good, make_manifest([77], [str(bomb)], "gallery"))
    summary = extract_to_lance(rows, tmp_path / "f.lance", *TINY, ExtractSettings(batch_size=2))
    assert summary.extracted == 3 and summary.errors == 1
    reasons = {r["id"]: r["reason"] for r in lance.dataset(str(tmp_path / "f-errors.lance")).to_table().to_pylist()}
    assert "100000x100000 pixels exceed the limit" in reasons[77]
    # the limit is configuration: a tiny one makes every image an error
    small = extract_to_lance(good, tmp_path / "g.lance", *TINY, ExtractSettings(batch_size=2, max_image_pixels=100))
    assert small.errors == 3 and small.extracted == 0


def pa_concat(*tables):
    from rrt_dist.datasets import concat_manifests

    return concat_manifests(tables)


# --------------------------------------------------------------------------------- 4. checkpoints cannot run code

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_trainer_state_with_a_planted_payload_is_refused(tmp_path):
    from rrt_dist.train.core import load_trainer_state

    marker = tmp_path / "ran"
    torch.save({"epoch": 1, "history": [], "extra": Payload(str(marker))}, tmp_path / "trainer.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_trainer_state(tmp_path)
    assert not marker.exists()
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2], 0.1)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": 0,
                "history": [{"epoch": 1, "val_metrics": {"medium": {"mP@k": {1: 0.5}}}}]}, tmp_path / "trainer.pt")
    assert load_trainer_state(tmp_path)["scheduler"]["milestones"] == {2: 1}   # what training writes loads safely


# ------------------------------------------------------------------------------------------------ 5. bad values

@pytest.mark.parametrize("override, key", [
    ("index.neighbours=0", "index.neighbours"), ("index.neighbours=-5", "index.neighbours"),
    ("index.mode=approximate", "index.mode"), ("reranker.depth=0", "reranker.depth"), ("reranker.k=-1", "reranker.k"),
    ("index.n_shards=0", "index.n_shards"), ("train.lr=0", "train.lr"), ("train.milestones=[0]", "train.milestones"),
    ("backbone.batch_size=0", "backbone.batch_size"), ("dataset.n_landmarks=0", "dataset.n_landmarks"),
    ("train.positive_scope=any", "train.positive_scope"), ("reranker.methods=[global,gvv]", "reranker.methods"),
    ("index.factory=IVFxyz", "index.factory"), ("reranker.qualitative_row=rrt", "reranker.qualitative_row"),
    ("backbone.options.checkpoint=/no/such.pt", "backbone.options.checkpoint"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    cfg = make([override])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value).startswith(key)


def test_valid_options_need_no_plus_and_typos_fail():
    cfg = make(["backbone.options.pretrained=false", "backbone.options.max_size=512", "backbone.retry_errors=true"])
    validate_config(cfg)
    assert cfg.backbone.options.max_size == 512 and cfg.backbone.retry_errors
    from rrt_dist.pipelines.features import extract_settings

    assert extract_settings(cfg.backbone).retry_errors
    with pytest.raises(Exception, match="chekpoint"):
        make(["backbone.options.chekpoint=x"])


def test_more_shards_than_vectors_are_capped(local_ray, tmp_path, caplog):
    from rrt_dist.index.sharded import ShardedIndex, build_index

    ids = np.arange(1, 11, dtype=np.int64)
    vectors = np.eye(10, 16, dtype=np.float32)
    schema = features_schema(16, 0, 0, "test", {}, "fp")
    uri = tmp_path / "t.lance"
    from rrt_dist.store import commit_fragments

    commit_fragments(uri, schema, write_fragment(uri, features_to_table(schema, ids, vectors, np.zeros((10, 0, 0)),
                                                                        None, None, np.zeros(10))))
    manifest = build_index(FeatureStore(uri), str(tmp_path / "index"), "Flat", n_shards=60)
    assert len(manifest.shards) == 10 and "60 shards asked for 10 vectors" in caplog.text
    index = ShardedIndex(str(tmp_path / "index"))
    _, found = index.search(vectors[:3], 1)
    index.close()
    assert found[:, 0].tolist() == [1, 2, 3]


def test_a_full_device_at_an_index_commit_is_one_line_commits_nothing_and_a_rerun_recovers(local_ray, tmp_path):
    """The device fills up while an index version is written (a file the driver writes, a shard a Ray task writes,
    the manifest's commit): one StorageFull line naming the index and the version still searched, no chained
    traceback; nothing of the failed version is searched (never a truncated file renamed into place), and the
    same call, with space again, commits it. (/dev/full answers every write with ENOSPC.)"""
    from rrt_dist.index.core import current_manifest
    from rrt_dist.index.sharded import ShardedIndex, build_index, update_index
    from rrt_dist.schema import StorageFull
    from rrt_dist.store import commit_fragments

    schema = features_schema(16, 0, 0, "test", {}, "fp")
    uri, directory = tmp_path / "t.lance", tmp_path / "index"
    vectors = np.eye(16, dtype=np.float32)

    def add(ids):
        commit_fragments(uri, schema, write_fragment(uri, features_to_table(
            schema, np.asarray(ids), vectors[np.asarray(ids) % 16], np.zeros((len(ids), 0, 0)), None, None,
            np.zeros(len(ids)))))

    def fails_full(call, file, still):
        (directory / file).symlink_to("/dev/full")
        with pytest.raises(StorageFull) as err:
            call()
        assert str(err.value).startswith(f"no space left on the device of {directory} while writing a new index "
                                         f"version") and still in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__       # one line, nothing chained
        (directory / file).unlink()

    add(range(10))
    directory.mkdir()
    build = lambda: build_index(FeatureStore(uri), str(directory), "Flat", n_shards=2)  # noqa: E731
    fails_full(build, "trained-v000001.faiss.tmp", "no version was committed")
    assert current_manifest(str(directory)) is None
    assert build().version == 1
    add(range(10, 14))
    update = lambda: update_index(FeatureStore(uri), str(directory), rebuild_fraction=0.5)  # noqa: E731
    fails_full(update, "shard-00002-v000002.faiss.tmp", "version 1 stays the one searched")     # in a Ray task
    fails_full(update, "manifest.json.tmp", "version 1 stays the one searched")
    assert current_manifest(str(directory)).version == 1 and current_manifest(str(directory)).ntotal == 10
    assert update()[0].version == 2
    index = ShardedIndex(str(directory))
    _, found = index.search(vectors[10:14], 1)
    index.close()
    assert found[:, 0].tolist() == [10, 11, 12, 13]


# --------------------------------------------------------------------------- 6. user errors in one line, no Ray

def run_cli(*args, cwd):
    return subprocess.run([str(BIN / "rrt-dist"), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("setup, expected", [
    ("missing", "gallery.csv: file not found"),
    ("empty", "the gallery split of folder lists no image"),
    ("bad_value", "index.neighbours=0 is out of range"),
    ("misspelt_key", "index.neighbour: not an option of index; closest: index.neighbours"),
    ("misspelt_preset", "backbone=tiny_imag: no such backbone preset; closest: tiny_image"),
    ("bad_type", "train.lr=fast: Value 'fast' of type 'str' could not be converted to Float"),
])
def test_user_errors_print_one_line_and_start_no_ray(tmp_path, setup, expected):
    root = tmp_path / "data"
    args = ["evaluate", "dataset=folder", f"dataset.root={root}", "backbone=tiny_image", "reranker=none",
            f"hydra.run.dir={tmp_path / 'out'}"]
    if setup == "empty":
        root.mkdir()
        (root / "gallery.csv").write_text("path,label\n")
    extra = {"bad_value": ["index.neighbours=0"], "misspelt_key": ["index.neighbour=3"], "bad_type": ["train.lr=fast"],
             "misspelt_preset": ["backbone=tiny_imag"]}
    args += extra.get(setup, [])
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rrt-dist: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "starting embedded Ray" not in proc.stdout + proc.stderr


# ----------------------------------------------------------- 7. retrying fixed images, unreadable counts, summaries

def test_fixed_images_are_retried_and_unreadable_images_are_counted(local_ray, two_folders, tmp_path):
    a, _ = two_folders
    root = tmp_path / "data"
    shutil.copytree(a, root)
    saved = {n: (root / n).read_bytes() for n in ("q0.jpg", "g3.jpg")}
    for name in saved:
        (root / name).write_bytes(b"not an image")
    features = tmp_path / "features"
    broken = run_evaluation(root, features, tmp_path / "o1")
    assert broken["run"]["unreadable"] == {"query": 1, "gallery": 1}
    assert "unreadable images (scored as misses): query 1, gallery 1" in (tmp_path / "o1" / "report.md").read_text()
    for name, data in saved.items():                     # fixed: new content, so the recorded errors are retried
        (root / name).write_bytes(data)
    fixed = run_evaluation(root, features, tmp_path / "o2")
    reference = run_evaluation(a, tmp_path / "fresh", tmp_path / "o3")
    assert fixed["run"]["unreadable"] == {"query": 0, "gallery": 0} and fixed["results"] == reference["results"]


def test_rerun_summary_tells_extracted_from_recorded(local_ray, small_synthetic, tmp_path):
    _, root = small_synthetic
    good = read_revisitop(root, "synthetic").gallery.slice(0, 6)
    bad = make_manifest([901, 902], [str(tmp_path / "missing1.jpg"), str(tmp_path / "missing2.jpg")], "gallery")
    rows = pa_concat(good, bad)
    uri = tmp_path / "f.lance"
    extract_to_lance(rows, uri, *TINY, ExtractSettings(batch_size=4))
    rerun = extract_to_lance(rows, uri, *TINY, ExtractSettings(batch_size=4))
    assert (rerun.already, rerun.recorded_errors, rerun.extracted) == (6, 2, 0)
    retry = extract_to_lance(rows, uri, *TINY, ExtractSettings(batch_size=4, retry_errors=True))
    assert (retry.already, retry.recorded_errors, retry.errors) == (6, 0, 2)
    errors = lance.dataset(str(tmp_path / "f-errors.lance")).to_table().column("id").to_pylist()
    assert sorted(errors) == [901, 902]                   # retried records replaced, not duplicated


# ------------------------------------------------------------- chaos: kill -9 at random commit points, SIGTERM

CHAOS_DRIVER = """
import sys
from rrt_dist.config import RayConfig
from rrt_dist.datasets import read_revisitop
from rrt_dist.pipelines.extract import ExtractSettings, extract_to_lance
from rrt_dist.runtime import init_ray, stopping_in_one_line
root, uri, stop, address = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
with stopping_in_one_line():                       # as a job: Ctrl-C and SIGTERM stop it in one line
    init_ray(RayConfig(address=address))
    manifest = read_revisitop(root, "synthetic").gallery.slice(0, 40)
    settings = ExtractSettings(batch_size=2, commit_every=6, stop_after_commits=None if stop == "none" else int(stop),
                               stop_by_kill=True)
    extract_to_lance(manifest, uri, "tiny-image", {}, settings)
"""


def sorted_rows(uri):
    table = lance.dataset(str(uri)).to_table(columns=["id", "global", "n_local", "source"])
    return table.sort_by("id").to_pylist()


@pytest.fixture(scope="module")
def chaos(local_ray, small_synthetic, tmp_path_factory):
    """``start(uri, stop)``: a driver process extracting 40 images into ``uri`` on the session's Ray (stopping as
    a job does), killed (-9) at its commit after ``stop`` ones (``"none"``: runs to the end); the rows of a clean
    run, and its table."""
    _, root = small_synthetic
    address = local_ray.get_runtime_context().gcs_address
    script = tmp_path_factory.mktemp("chaos") / "driver.py"
    script.write_text(CHAOS_DRIVER)

    def start(uri, stop):
        return subprocess.Popen([sys.executable, str(script), str(root), str(uri), str(stop), address],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    reference = script.parent / "reference.lance"
    assert start(reference, "none").wait(timeout=300) == 0
    expected = sorted_rows(reference)
    assert len(expected) == 40
    return start, expected, reference


def test_chaos_sigterm_then_kill_the_driver_at_a_random_commit(chaos, small_synthetic, tmp_path, capsys):
    """SIGTERM (a pod's eviction) while the driver extracts, then kill -9 at a random commit: each rerun equals a
    clean run. SIGTERM stops it as Ctrl-C does, well inside Kubernetes' 30 s: whole commits only, one line saying
    what is kept and that the same command resumes, exit 143, no native stack dump. The table killed at a commit
    then loses one data file (its manifest intact): reading it or extracting into it stops with the named error
    (the table, the file, the repair command), never a store traceback; `rrt-dist restore-table` sets it back to
    the newest version whose files are all there, and the same rerun repairs it too."""
    import signal
    import time

    from rrt_dist.cli import main as cli_main
    from rrt_dist.schema import DamagedTable
    from rrt_dist.store import manifest_versions

    start, expected, _ = chaos
    rng = np.random.default_rng(0)
    for seed, stop in enumerate(["term", int(rng.integers(1, 6))]):   # the two-writer test kills at random commits too
        uri = tmp_path / f"stopped-{seed}.lance"
        stopped = start(uri, "none" if stop == "term" else stop)
        if stop == "term":
            while len(manifest_versions(uri)) < 2:               # in the middle of the extraction
                assert stopped.poll() is None, stopped.stderr.read()[-2000:]
                time.sleep(0.05)
            signalled = time.monotonic()
            stopped.send_signal(signal.SIGTERM)
            _, err = stopped.communicate(timeout=60)
            assert stopped.returncode == 143 and time.monotonic() - signalled < 15, err[-2000:]
            assert "rrt-dist: interrupted (SIGTERM): every committed table version" in err and "rerun the same " \
                   "command to resume" in err and "Traceback" not in err and "SIGTERM received" not in err, err[-2000:]
            assert 12 <= len(committed_ids(uri)) < 40 and len(committed_ids(uri)) % 6 == 0     # whole commits only
        else:
            assert stopped.wait(timeout=300) == -9, stopped.stderr.read()[-2000:]
            assert len(committed_ids(uri)) == 6 * stop
        lost = set()
        if stop != "term" and stop >= 3:
            lost.add(lose_a_data_file_then_restore(uri, small_synthetic[1], capsys, cli_main, DamagedTable))
        age(uri / "data", hours=2)                # the stopped run's uncommitted files: past the grace period
        rerun = start(uri, "none")
        assert rerun.wait(timeout=300) == 0, rerun.stderr.read()[-2000:]
        assert sorted_rows(uri) == expected
        data_files = {p.name for p in (uri / "data").iterdir()}           # no uncommitted fragment left
        tracked = lance.dataset(str(uri)).tracked_files().read_all().to_pylist()
        assert data_files == {Path(f["path"]).name for f in tracked if f["type"] == "data file"} - lost


def lose_a_data_file_then_restore(uri, root, capsys, cli_main, damaged_table):
    """Lose the data file of one fragment committed in version 3 of ``uri`` (3 fragments a version), check the
    named error where the table is read and where an extraction into it begins, and restore the table; returns
    the lost file's name."""
    lost = lance.dataset(str(uri)).get_fragments()[7].data_files()[0].path
    (uri / "data" / lost).unlink()
    manifest = read_revisitop(root, "synthetic").gallery.slice(0, 40)
    for use in (lambda: FeatureStore(uri), lambda: committed_ids(uri),    # not ArrowInvalid from deep in a read
                lambda: extract_to_lance(manifest, uri, *TINY, ExtractSettings(batch_size=2))):
        with pytest.raises(damaged_table) as err:
            use()
        assert f"data/{lost} is missing" in str(err.value) and f"rrt-dist restore-table {uri}" in str(err.value)
        assert "back to version 2, the newest whose files are all there" in str(err.value)
    cli_main(["restore-table", str(uri)])
    assert "now holds the rows of version 2" in capsys.readouterr().out and len(FeatureStore(uri)) == 12
    return lost


def test_chaos_two_writers_and_a_kill_on_one_table_equal_a_clean_run(chaos, tmp_path):
    """Two writers of one table at once, one of them killed (-9) at a random commit: whatever the order, the table
    ends, after a rerun, with every image once and the clean run's descriptors. (One draw: the test above kills
    at random commits too, and its drivers are the suite's time.)"""
    start, expected, _ = chaos
    for seed, stop in enumerate(np.random.default_rng(1).integers(0, 6, size=1).tolist()):
        uri = tmp_path / f"shared-{seed}.lance"
        killed, plain = start(uri, stop), start(uri, "none")
        # the killed one dies (-9) if it held the lock first, or finds nothing left to extract (0)
        assert killed.wait(timeout=300) in (0, -9) and plain.wait(timeout=300) == 0, plain.stderr.read()[-2000:]
        assert start(uri, "none").wait(timeout=300) == 0
        rows = sorted_rows(uri)
        assert [r["id"] for r in rows] == sorted({r["id"] for r in rows})         # every image once
        assert rows == expected


def test_two_evaluations_at_once_on_one_storage_root_give_the_clean_numbers(local_ray, two_folders, tmp_path):
    """Two `rrt-dist evaluate` processes started together on one folder dataset and one storage root: one waits
    for the other's table, nothing is extracted twice, both report what a lone run reports (not 200 %)."""
    a, _ = two_folders
    address = local_ray.get_runtime_context().gcs_address
    common = ["evaluate", "dataset=folder", f"dataset.root={a}", "backbone=tiny_image", "reranker=none",
              f"storage_root={tmp_path / 'shared'}", f"ray.address={address}"]
    runs = [subprocess.Popen([str(BIN / "rrt-dist"), *common, f"hydra.run.dir={tmp_path / f'out{i}'}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path) for i in range(2)]
    for run in runs:
        assert run.wait(timeout=400) == 0, run.stderr.read()[-3000:]
    alone = run_evaluation(a, tmp_path / "alone" / "features", tmp_path / "o-alone")
    for i in range(2):
        report = json.loads((tmp_path / f"out{i}" / "report.json").read_text())
        assert report["results"] == alone["results"]
    [table] = [p for p in (tmp_path / "shared" / "features").rglob("gallery.lance")]
    ids = FeatureStore(table).ids                   # a reader refuses a table that holds an id twice
    assert len(ids) == len(set(ids.tolist())) == 20


def test_a_table_holding_an_id_twice_is_refused_and_no_metric_leaves_0_1(tmp_path):
    from rrt_dist.datasets.base import checked_fractions
    from rrt_dist.schema import FeatureTableMismatch

    schema = features_schema(4, 0, 0, "test", {}, "fp-test")
    table = features_to_table(schema, np.asarray([7]), np.eye(4, dtype=np.float32)[:1], np.zeros((1, 0, 0)), None,
                              None, np.zeros(1))
    lance.write_dataset(table, tmp_path / "t.lance")
    lance.write_dataset(table, tmp_path / "t.lance", mode="append")        # a second writer, same image
    with pytest.raises(FeatureTableMismatch, match="holds 1 image id\\(s\\) more than once, e.g. \\[7\\]"):
        FeatureStore(tmp_path / "t.lance")
    assert checked_fractions({"medium": {"mAP": 1.0, "mP@k": {1: 0.5}}}, "b")
    with pytest.raises(RuntimeError, match="metric medium/mAP = 2.0 is outside"):
        checked_fractions({"medium": {"mAP": 2.0}}, "b")


# ----------------------------------------------------------------------------- leave-one-out, reports, checkpoints

def test_leave_one_out_extracts_once_and_reports_what_it_ran(local_ray, two_folders, tmp_path):
    a, _ = two_folders
    root = tmp_path / "loo"
    shutil.copytree(a, root)
    (root / "queries.csv").unlink()
    features = tmp_path / "features"
    out = tmp_path / "out"
    report = run_evaluation(root, features, out, ["reranker.methods=[global,gv]", "backbone=lite0_multiscale",
                                                  "backbone.options.max_size=128", "backbone.options.max_local=60"])
    assert sorted(p.name for p in features.rglob("*.lance") if (p / "_versions").is_dir()) == ["gallery.lance"]
    assert report["run"]["leave_one_out"] and report["run"]["queries"] == 20
    rows = report["results"]
    assert "GV (top-19)" in rows                          # 20 images, the query itself excluded: 19 candidates
    assert {"P@1", "RP", "MAP@R", "mAP"} <= set(rows["Global only"]["folder"])
    markdown = (out / "report.md").read_text()
    assert f"`{root.resolve()}`" in markdown and "20 queries, 20 gallery images (leave-one-out" in markdown
    assert report["run"]["qualitative_row"] == "GV (top-19)" and (out / "qualitative.png").exists()


def test_checkpoints_ray_train_never_recorded_are_removed(tmp_path):
    from rrt_dist.train.distributed import remove_unrecorded_checkpoints

    run = tmp_path / "run"
    for name in ("epoch_001", "epoch_002", "epoch_003", "tensorboard"):
        (run / name).mkdir(parents=True)
        (run / name / "model.pt").write_bytes(b"x")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "epoch_001", "metrics": {}}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "epoch_002", "metrics": {}}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert remove_unrecorded_checkpoints(str(run)) == ["epoch_003"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_manager_snapshot.json", "epoch_001", "epoch_002",
                                                     "tensorboard"]
    # With no readable record nothing is provably unrecorded: a damaged or missing snapshot deletes nothing
    (run / "checkpoint_manager_snapshot.json").write_text("{garbage")
    assert remove_unrecorded_checkpoints(str(run)) == []
    (run / "checkpoint_manager_snapshot.json").unlink()
    assert remove_unrecorded_checkpoints(str(run)) == []
    assert sorted(p.name for p in run.iterdir()) == ["epoch_001", "epoch_002", "tensorboard"]


CTRL_C_JOB = """
import pathlib, sys, time
from rrt_dist.runtime import entry_point

def run(cfg):
    pathlib.Path(sys.argv[-1].split("=", 1)[1], "started").touch()
    time.sleep(120)

main = entry_point(run)
main()
"""


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    """SIGINT while a job runs: one line saying what is kept and that the same command resumes; exit 130. (The
    job is one that waits, so the signal lands while it runs, through Hydra and the job wrapper as in every job.)"""
    import signal
    import time

    script = tmp_path / "waits.py"
    script.write_text(CTRL_C_JOB)
    out = tmp_path / "out"
    # SIGINT as a terminal delivers it: a child inherits an ignored SIGINT (this test process may ignore it once
    # Ray runs in it), and Python then raises no KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, str(script), f"hydra.run.dir={out}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / "started").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "rrt-dist: interrupted (SIGINT): every committed table version" in err and "rerun the same command" in err
    assert "Traceback" not in err
