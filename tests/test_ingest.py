"""Galleries that grow: ingest batches of new images, survive kill -9, equal a build from scratch."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rrt_dist.config import GalleryConfig, IndexConfig
from rrt_dist.datasets import read_revisitop
from rrt_dist.datasets.base import stable_id
from rrt_dist.datasets.image_list import new_images
from rrt_dist.index.core import read_manifest, search_numpy_exact
from rrt_dist.index.sharded import ShardedIndex, build_index, read_rows
from rrt_dist.gallery import Gallery
from rrt_dist.pipelines.ingest import ingest, list_galleries
from rrt_dist.schema import ExtractSettings
from rrt_dist.store import FeatureStore

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

DRIVER = """
import json, sys, ray
from rrt_dist.config import GalleryConfig, IndexConfig
from rrt_dist.pipelines.ingest import ingest
from rrt_dist.schema import ExtractSettings
root, name, manifest, stop, address = sys.argv[1:6]
ray.init(address=address, logging_level="ERROR")
settings = ExtractSettings(batch_size=2, commit_every=4, stop_after_commits=None if stop == "none" else int(stop),
                           stop_by_kill=True)
summary = ingest(GalleryConfig(name=name, root=root, manifest=manifest), "tiny-image", {}, settings,
                 IndexConfig(factory="Flat", n_shards=2, rebuild_fraction=0.9))
print(json.dumps({k: v for k, v in summary.items() if k != "error_samples"}))
"""


@pytest.fixture(scope="module")
def batches(small_synthetic, tmp_path_factory):
    """Three CSV batches of gallery images (the last one repeats two images of the first and adds new ones)."""
    _, root = small_synthetic
    uris = read_revisitop(root, "synthetic").gallery.column("uri").to_pylist()
    folder = tmp_path_factory.mktemp("batches")
    parts = {"b1": uris[:16], "b2": uris[16:36], "b3": uris[:2] + uris[36:44]}
    for name, rows in parts.items():
        (folder / f"{name}.csv").write_text("uri\n" + "\n".join(rows) + "\n")
    return folder, parts


def snapshot_of(gallery: Path):
    return Gallery.open(str(gallery.parent), gallery.name).snapshot()


def check_equals_a_build_from_scratch(gallery: Path, tmp_path: Path, expected_uris: list[str]):
    """The gallery's snapshot: its table holds each image once, its catalog lists each exactly once with its path,
    its index holds exactly the table's rows, and searching it gives what a Flat index built from scratch over the
    same rows gives."""
    snapshot = snapshot_of(gallery)
    store = snapshot.features()
    assert len(np.unique(store.ids)) == len(store.ids) == len(expected_uris)
    assert sorted(store.ids.tolist()) == sorted(stable_id(u) for u in expected_uris)
    listed_ids, listed_uris = snapshot.catalog_version_reader().all()
    assert sorted(zip(listed_ids.tolist(), listed_uris.tolist())) == sorted((stable_id(u), u) for u in expected_uris)
    manifest = read_manifest(snapshot.index, snapshot.index_version)
    assert manifest.version == read_manifest(snapshot.index).version
    indexed = read_rows(snapshot.index, manifest)[0]
    assert len(np.unique(indexed)) == len(indexed) and sorted(indexed.tolist()) == sorted(store.ids.tolist())
    build_index(store, str(tmp_path / "scratch"), factory="Flat", n_shards=2)
    ids, vectors = store.globals()
    queries = vectors[:8]
    served, scratch = ShardedIndex(snapshot.index), ShardedIndex(str(tmp_path / "scratch"))
    (got_scores, got), (want_scores, want) = served.search(queries, 10), scratch.search(queries, 10)
    served.close()
    scratch.close()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_scores, want_scores)
    np.testing.assert_allclose(got_scores, search_numpy_exact(vectors, ids, queries, 10)[0], atol=1e-5)
    return snapshot, manifest


def test_batches_with_kill_9_in_the_middle_equal_a_build_from_scratch(local_ray, batches, tmp_path):
    folder, parts = batches
    address = local_ray.get_runtime_context().gcs_address
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    root = tmp_path / "galleries"

    def drive(batch):
        """The ingest of ``batch`` in this process (the same code the driver process runs)."""
        return ingest(GalleryConfig(name="shop", root=str(root), manifest=str(folder / f"{batch}.csv")), "tiny-image",
                      {}, ExtractSettings(batch_size=2, commit_every=4),
                      IndexConfig(factory="Flat", n_shards=2, rebuild_fraction=0.9))

    assert drive("b1")["index_action"] == "build"
    # a driver process killed (-9) after two commits of the second batch
    killed = subprocess.run([sys.executable, str(script), str(root), "shop", str(folder / "b2.csv"), "2", address],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert snapshot_of(root / "shop").index_version == 1
    summary = drive("b2")
    assert (summary["new"], summary["skipped"], summary["failed"]) == (12, 8, 0)   # 8 committed before the kill
    assert summary["index_action"] == "add" and summary["index_added"] == 20 and summary["index_version"] == 2
    check_equals_a_build_from_scratch(root / "shop", tmp_path / "s1", parts["b1"] + parts["b2"])

    # killed while committing the index: its files are written, its manifest never is
    import rrt_dist.index.sharded as sharded

    def crash(*_):
        raise KeyboardInterrupt("killed before the manifest commit")

    original = sharded.write_manifest
    sharded.write_manifest = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            ingest(GalleryConfig(name="shop", root=str(root), manifest=str(folder / "b3.csv")), "tiny-image", {},
                   ExtractSettings(batch_size=2), IndexConfig(factory="Flat", n_shards=2, rebuild_fraction=0.9))
    finally:
        sharded.write_manifest = original
    summary = drive("b3")
    assert (summary["new"], summary["skipped"], summary["index_added"], summary["index_version"]) == (0, 10, 8, 3)
    snapshot, manifest = check_equals_a_build_from_scratch(root / "shop", tmp_path / "s2",
                                                           parts["b1"] + parts["b2"] + parts["b3"][2:])
    index_files = {p.name for p in Path(snapshot.index).iterdir()}
    assert not any(".tmp" in n for n in index_files)
    assert [h["index_version"] for h in Gallery.open(str(root), "shop").history] == [1, 2, 3]
    [listed] = list_galleries(str(root))
    assert (listed["name"], listed["state"], listed["rows"], listed["index_version"], listed["index_rows"]) == \
        ("shop", "ready", 44, 3, 44)


def test_input_errors_name_the_file(tmp_path):
    from rrt_dist.schema import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match="exactly one of"):
        new_images()
    (tmp_path / "m.csv").write_text("name\nx.jpg\n")
    with pytest.raises(DatasetLayoutError, match="no uri or path column"):
        new_images(manifest=str(tmp_path / "m.csv"))
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.jpg", "sub/a.PNG", "notes.txt"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    rows = new_images(images=str(tmp_path / "imgs"))
    assert [Path(u).name for u in rows.column("uri").to_pylist()] == ["b.jpg", "a.PNG"]
    (tmp_path / "rel.csv").write_text("path,label\nimgs/b.jpg,3\n")
    rel = new_images(manifest=str(tmp_path / "rel.csv"))
    assert rel.column("uri").to_pylist() == [str((tmp_path / "imgs" / "b.jpg").resolve())]
    assert rel.column("id").to_pylist() == rows.column("id").to_pylist()[:1]      # same image, same stable id


def test_ingest_refuses_database_augmentation_before_touching_the_gallery(tmp_path):
    """A gallery's index is updated in place; alpha-DBA vectors would go stale with each batch."""
    from rrt_dist.schema import ConfigError

    (tmp_path / "imgs").mkdir()
    with pytest.raises(ConfigError, match="index.dba_n"):
        ingest(GalleryConfig(name="shop", root=str(tmp_path / "g"), images=str(tmp_path / "imgs")), "tiny-image", {},
               ExtractSettings(), IndexConfig(dba_n=1))
    assert not (tmp_path / "g").exists()


def test_ingest_and_galleries_jobs(run_job, small_synthetic, tmp_path, capsys):
    _, root = small_synthetic
    images = tmp_path / "photos"
    images.mkdir()
    for uri in read_revisitop(root, "synthetic").gallery.column("uri").to_pylist()[:6]:
        os.symlink(uri, images / Path(uri).name)
    common = [f"gallery.root={tmp_path / 'g'}", "gallery.name=photos", "backbone=tiny_image"]
    summary = run_job("ingest", [f"gallery.images={images}", *common], tmp_path / "out")
    assert (summary["new"], summary["index_version"]) == (6, 1)
    printed = capsys.readouterr().out
    assert "gallery photos: 6 images in this batch: 6 new" in printed and "index version 1" in printed
    run_job("galleries", common, tmp_path / "out2")
    assert "photos: 6 rows, index v1 (6 rows, Flat, 1 shards)" in capsys.readouterr().out


def test_a_batch_of_unreadable_images_is_refused_and_counted(local_ray, batches, tmp_path):
    from rrt_dist.schema import DatasetLayoutError

    folder, parts = batches
    (tmp_path / "broken.csv").write_text("uri\nmissing-1.jpg\nmissing-2.jpg\n")
    gallery = GalleryConfig(name="broken", root=str(tmp_path / "g"), manifest=str(tmp_path / "broken.csv"))
    args = ("tiny-image", {}, ExtractSettings(batch_size=2), IndexConfig(factory="Flat"))
    with pytest.raises(DatasetLayoutError, match="no image of the batch could be read"):
        ingest(gallery, *args)
    (tmp_path / "mixed.csv").write_text("uri\n" + "\n".join(parts["b1"][:3] + [str(tmp_path / "missing-3.jpg")]))
    summary = ingest(GalleryConfig(name="broken", root=str(tmp_path / "g"), manifest=str(tmp_path / "mixed.csv")),
                     *args)
    assert (summary["new"], summary["failed"], summary["rows"], summary["index_version"]) == (3, 1, 3, 1)
    assert "missing-3.jpg" in str(summary["error_samples"])
    snapshot = Gallery.open(str(tmp_path / "g"), "broken").snapshot()
    listed = dict(zip(*[a.tolist() for a in snapshot.catalog_version_reader().all()]))
    assert sorted(listed.values()) == sorted(parts["b1"][:3])                 # the unreadable row is never listed
    # a later manifest giving a listed id another path is refused by row, not a silent replacement
    taken = stable_id(parts["b1"][0])
    (tmp_path / "other.csv").write_text(f"id,uri\n{taken},{parts['b1'][5]}\n{stable_id(parts['b1'][6])},{parts['b1'][6]}\n")
    other = GalleryConfig(name="broken", root=str(tmp_path / "g"), manifest=str(tmp_path / "other.csv"))
    summary = ingest(other, *args)
    assert (summary["refused"], summary["new"], summary["rows"]) == (1, 1, 4)
    assert f"id {taken} is already the gallery's image {parts['b1'][0]}" in summary["refused_samples"][taken]
    assert Gallery.open(str(tmp_path / "g"), "broken").snapshot().catalog_version_reader().uris([taken]) == \
        {taken: parts["b1"][0]}
    other.replace = True                                                      # asked for: the image is replaced
    summary = ingest(other, *args)
    assert (summary["refused"], summary["changed"], summary["rows"]) == (0, 1, 4)
    assert Gallery.open(str(tmp_path / "g"), "broken").snapshot().catalog_version_reader().uris([taken]) == \
        {taken: parts["b1"][5]}


HOLDER = """
import sys, time, pathlib
from rrt_dist.gallery import Gallery
with Gallery.open(*sys.argv[1].rsplit("/", 1)).lock():
    print("held", flush=True)
    while not pathlib.Path(sys.argv[2]).exists():
        time.sleep(0.05)
"""


def test_ingests_into_one_gallery_take_turns_and_a_killed_one_leaves_no_lock(tmp_path):
    """Two ingests into the same gallery would append the same ids twice and race for the index version: the
    second waits for the first's lock; a holder killed with SIGKILL releases it (the kernel drops the flock)."""
    import threading
    import time

    from rrt_dist.store.locks import Busy

    directory, release = str(tmp_path / "galleries" / "shop"), tmp_path / "release"
    gallery_lock = lambda wait=True: Gallery.open(str(tmp_path / "galleries"), "shop").lock(wait)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, directory, str(release)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Busy, match=f"pid {holder.pid}"):
        with gallery_lock(wait=False):
            pass
    threading.Timer(1.0, release.touch).start()
    start = time.monotonic()
    with gallery_lock():                                 # waits until the holder lets go
        waited = time.monotonic() - start
    assert waited >= 0.9 and holder.wait(10) == 0

    release.unlink()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, directory, str(release)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(10)
    with gallery_lock(wait=False):                       # nothing left locked
        pass


def test_images_and_manifests_can_be_fsspec_uris():
    """A batch on an object store (here fsspec's in-memory file system): the folder listed, the manifest read,
    its relative entries resolved against its folder, the images decoded, and a rewritten object detected."""
    import io

    import fsspec
    from PIL import Image

    from rrt_dist.features.images import file_identity, load_image

    fs = fsspec.filesystem("memory")
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    for name in ("new/b.png", "new/sub/a.png"):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        fs.pipe(f"/bucket/{name}", buffer.getvalue())
    fs.pipe("/bucket/new/notes.txt", b"x")
    fs.pipe("/bucket/batch.csv", b"path,label\nnew/b.png,3\nmemory:///bucket/new/sub/a.png,4\n")

    listed = new_images(images="memory:///bucket/new").column("uri").to_pylist()
    assert listed == ["memory:///bucket/new/b.png", "memory:///bucket/new/sub/a.png"]
    batch = new_images(manifest="memory:///bucket/batch.csv")
    assert batch.column("uri").to_pylist() == listed and batch.column("label").to_pylist() == [3, 4]
    assert batch.column("id").to_pylist() == new_images(images="memory:///bucket/new").column("id").to_pylist()
    np.testing.assert_array_equal(load_image(listed[0]), rgb)

    before = file_identity(listed[0])
    fs.pipe("/bucket/new/b.png", fs.cat("/bucket/new/sub/a.png") + b"")       # rewritten in place
    assert file_identity(listed[0]) != before
    assert file_identity("memory:///bucket/new/gone.png") == "missing"


def test_a_corrupt_newest_version_keeps_every_row_and_names_the_table(local_ray, batches, tmp_path, capsys):
    """A garbage newest manifest is an error naming the table and its last readable version, never "no table":
    nothing is removed, and `rrt-dist restore-table` sets the table back so the same ingest completes. A lost data
    file: the gallery is listed as damaged; restore-table, then an ingest, makes it equal the undamaged one."""
    from rrt_dist.cli import main as cli_main
    from rrt_dist.schema import UnreadableTable
    from rrt_dist.store import manifest_versions

    folder, parts = batches
    args = ("tiny-image", {}, ExtractSettings(batch_size=4, commit_every=8), IndexConfig(factory="Flat"))
    gallery = lambda batch: GalleryConfig(name="kept", root=str(tmp_path / "g"), manifest=str(folder / f"{batch}.csv"))
    ingest(gallery("b1"), *args)
    ingest(gallery("b2"), *args)
    table = snapshot_of(tmp_path / "g" / "kept").table
    versions = manifest_versions(table)
    data_files = sorted((Path(table) / "data").iterdir())
    assert len(versions) >= 3
    Path(versions[max(versions)]).write_bytes(b"garbage" * 3)
    with pytest.raises(UnreadableTable, match=f"{re.escape(table)}: its newest version \\({max(versions)}\\) cannot be "
                                              f"read .*last readable version is {max(versions) - 1}"):
        ingest(gallery("b2"), *args)
    assert sorted((Path(table) / "data").iterdir()) == data_files              # not one file removed
    cli_main(["restore-table", table])
    assert f"back at version {max(versions) - 1}" in capsys.readouterr().out
    summary = ingest(gallery("b2"), *args)                                       # the lost commit is redone
    assert summary["rows"] == len(parts["b1"]) + len(parts["b2"]) and summary["failed"] == 0
    assert len(set(FeatureStore(table).ids.tolist())) == summary["rows"]
    # Then one data file lost (its manifest intact): the gallery is listed as damaged, naming the file;
    # restore-table says how to finish; the ingest with no new images extracts exactly the lost rows again, and the
    # gallery equals the undamaged one (same ids, same index rows digest).
    import lance

    undamaged = snapshot_of(tmp_path / "g" / "kept")
    ids, digest = sorted(undamaged.features().ids.tolist()), read_manifest(undamaged.index).rows_digest
    fragment = lance.dataset(table).get_fragments()[0]
    lost, lost_rows = fragment.data_files()[0].path, fragment.count_rows()
    (Path(table) / "data" / lost).unlink()
    state = Gallery.open(str(tmp_path / "g"), "kept").describe()["state"]
    assert state.startswith("damaged: ") and f"data/{lost} is missing" in state and "rrt-dist restore-table" in state
    cli_main(["restore-table", table])
    assert f"rrt-dist ingest gallery.name=kept gallery.root={tmp_path / 'g'}" in capsys.readouterr().out
    repaired = ingest(GalleryConfig(name="kept", root=str(tmp_path / "g")), *args)
    assert repaired["restored"] == lost_rows and repaired["failed"] == 0
    snapshot = snapshot_of(tmp_path / "g" / "kept")
    assert sorted(snapshot.features().ids.tolist()) == ids and read_manifest(snapshot.index).rows_digest == digest


def test_search_a_gallery_with_query_images(run_job, small_synthetic, tmp_path, monkeypatch):
    """Query images against an ingested gallery: extracted with the gallery's extractor, the global top-k from
    its current index version (brute force as the oracle), GV reranking, and both images' paths in the results.
    Searched a chunk of queries at a time: a run stopped after its first chunk's commit (a half-written chunk
    beside it, as a kill -9 leaves) is finished by the same command, which searches only the chunk that is
    missing."""
    import pyarrow.parquet as pq

    from rrt_dist.index.sharded import ShardedIndex
    from rrt_dist.pipelines.search import ResultParts
    from rrt_dist.schema import ConfigError, DatasetLayoutError, GalleryNotReady

    _, root = small_synthetic
    uris = read_revisitop(root, "synthetic").gallery.column("uri").to_pylist()
    (tmp_path / "gallery.csv").write_text("uri\n" + "\n".join(uris[:10]) + "\n")
    (tmp_path / "queries.csv").write_text("uri\n" + "\n".join(uris[2:4]) + "\n")
    lite = ["backbone.options.scales=[1.0]", "backbone.options.global_scales=[1.0]", "backbone.options.max_local=16"]
    common = [f"gallery.root={tmp_path / 'g'}", "gallery.name=shop"]
    run_job("ingest", [*common, *lite, f"gallery.manifest={tmp_path / 'gallery.csv'}"], tmp_path / "ingest")
    searched, commit = [], ResultParts.commit

    def count(self, queries, k):
        searched.append(len(queries))
        return search(self, queries, k)

    def stop_after_the_first(self, n, table):
        commit(self, n, table)
        with self.fs.open(f"{self._part(n + 1)}.tmp", "wb") as f:         # what a kill mid-write leaves
            f.write(b"PAR1 half")
        raise KeyboardInterrupt("stopped after the first chunk")

    search = ShardedIndex.search
    monkeypatch.setattr(ShardedIndex, "search", count)
    monkeypatch.setattr(ResultParts, "commit", stop_after_the_first)
    job = [*common, *lite, f"search.queries={tmp_path / 'queries.csv'}", "search.rerank=gv", "index.neighbours=5",
           "search.chunk=1"]
    with pytest.raises(KeyboardInterrupt):
        run_job("search", job, tmp_path / "search-stopped")
    monkeypatch.setattr(ResultParts, "commit", commit)
    out = run_job("search", job, tmp_path / "search")
    assert searched == [1, 1]                           # the second run searched only the chunk that was missing
    assert (out["queries"], out["k"], out["index_version"]) == (2, 5, 1)
    assert not list((tmp_path / "g" / "shop" / "searches").glob("*/*"))      # the committed chunks are cleared
    results = pq.read_table(out["results"]).to_pylist()
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5] * 2
    for query, rows in ((uris[2], results[:5]), (uris[3], results[5:])):
        assert rows[0]["query_path"] == query and rows[0]["gallery_path"] == query   # each query finds itself first
        assert rows[0]["global_score"] == pytest.approx(1.0, abs=2e-3)
        assert sorted(r["reranked_rank"] for r in rows) == [1, 2, 3, 4, 5] and rows[0]["reranked_rank"] == 1
    gallery = snapshot_of(tmp_path / "g" / "shop").features()
    queries = FeatureStore(str(next((tmp_path / "g" / "shop" / "queries").rglob("query.lance"))))
    q_ids, q_vectors = queries.globals()
    _, want = search_numpy_exact(*gallery.globals()[::-1], q_vectors, 5)        # exact search: the oracle
    got = {r["query_id"]: [] for r in results}
    for r in results:
        got[r["query_id"]].append(r["gallery_id"])
    assert [got[int(q)] for q in q_ids] == want.tolist()
    assert (tmp_path / "search" / "results.csv").read_text().startswith("\"query_path\"")

    with pytest.raises(ConfigError, match="ingested with"):
        run_job("search", [*common, "backbone=tiny_image", f"search.queries={tmp_path / 'queries.csv'}"],
                tmp_path / "s2")
    with pytest.raises(ConfigError, match="search.rerank=rrt needs reranker.checkpoint"):     # before any extraction
        run_job("search", [*common, *lite, f"search.queries={tmp_path / 'queries.csv'}", "search.rerank=rrt"],
                tmp_path / "s4")
    (tmp_path / "broken.csv").write_text(f"uri\n{tmp_path / 'missing.jpg'}\n")
    with pytest.raises(DatasetLayoutError, match="no query image could be read"):
        run_job("search", [*common, *lite, f"search.queries={tmp_path / 'broken.csv'}"], tmp_path / "s5")
    with pytest.raises(GalleryNotReady, match="gallery 'nope' is not ready: it has not been ingested: run rrt-dist "
                                              "ingest gallery.name=nope"):
        run_job("search", [*common, *lite, "gallery.name=nope", f"search.queries={tmp_path / 'queries.csv'}"],
                tmp_path / "s3")
