"""Growing a gallery: ingesting new images vs extracting them into a fresh table, and adding rows to the
versioned index vs rebuilding it.

    python benchmarks/ingest.py [--quick] [--base 100] [--new 100] [--vectors 100000] [--factory IVF1024,SQ8]

1. Extraction: a gallery already holding ``--base`` images of the synthetic benchmark ingests ``--new`` more
   (``rrt-dist ingest``'s pipeline: extract what the table lacks, commit an index version); the same new images
   are extracted into a fresh table. ``extract_ratio`` = ingest images/s / fresh images/s, both wall clock
   around the call (target >= 0.9): what growing a gallery costs beyond extracting the new images.
2. Index: a ``--vectors`` gallery of synthetic 2048-d descriptors (a Lance table, fp16) indexed with
   ``--factory``; then +1 % and +10 % rows appended and committed as a new version (delta shards, the trained
   quantizer kept) vs a full rebuild over the same rows. ``add_speedup`` = rebuild s / add s.
3. Storage: ``--ingests`` batches of ``--batch`` images ingested one after the other into a new gallery (4 images
   a fragment, so the table passes 64 fragments and is compacted); after each, the bytes its feature table holds
   on disk (every version's files) over the table's size (its newest version's data files). Once with the
   default ``backbone.keep_versions`` (3: older versions and the files only they need are removed when a run
   ends), once keeping every version (as before versions were removed): ``table_on_disk_ratio`` at the end and
   the largest after any ingest (right after a compaction, until the version before it leaves the last 3).

The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from rrt_dist.config import GalleryConfig, IndexConfig, RayConfig
from rrt_dist.datasets import read_r1m, read_revisitop
from rrt_dist.datasets.generate import generate_synthetic
from rrt_dist.datasets.image_list import new_images
from rrt_dist.datasets.options import SyntheticSpec
from rrt_dist.gallery import Gallery
from rrt_dist.index.sharded import build_index, update_index
from rrt_dist.pipelines.extract import extract_to_lance
from rrt_dist.pipelines.ingest import ingest
from rrt_dist.config import available_cpus
from rrt_dist.runtime import init_ray
from rrt_dist.schema import ExtractSettings, PoolResources
from rrt_dist.store import FeatureStore, commit_fragments, features_schema, features_to_table, write_fragment

REPO = Path(__file__).resolve().parent.parent
DIM = 2048


def synthetic_images(data: str) -> None:
    """The images both parts ingest: a synthetic benchmark of 1,020 gallery images under ``data``."""
    generate_synthetic(SyntheticSpec(n_landmarks=20, n_val_landmarks=0, n_train_landmarks=0, n_distractors=1000),
                       data)


def extraction(work: Path, data: str, backbone: str, base: int, new: int) -> dict:
    synthetic_images(data)
    uris = [str(Path(u).resolve()) for u in read_revisitop(data, "synthetic", read_r1m(Path(data) / "distractors"))
            .gallery.column("uri").to_pylist()]
    if base + new > len(uris):
        raise SystemExit(f"at most {len(uris)} images")
    preset = yaml.safe_load((REPO / f"configs/backbone/{backbone}.yaml").read_text())
    name, options = preset["name"], preset.get("options", {})
    settings, resources = ExtractSettings(batch_size=16), PoolResources(intra_op_threads=available_cpus())
    for batch, rows in (("base", uris[:base]), ("new", uris[base:base + new])):
        (work / f"{batch}.csv").write_text("uri\n" + "\n".join(rows) + "\n")
    gallery = GalleryConfig(name="bench", root=str(work / "galleries"))
    index = IndexConfig(factory="Flat")
    ingest(GalleryConfig(**{**vars(gallery), "manifest": str(work / "base.csv")}), name, options, settings, index,
           resources)
    summary = ingest(GalleryConfig(**{**vars(gallery), "manifest": str(work / "new.csv")}), name, options, settings,
                     index, resources)
    assert summary["new"] == new, summary
    start = time.perf_counter()               # wall clock around both, as the ingest's seconds are
    extract_to_lance(new_images(manifest=str(work / "new.csv")), work / "fresh.lance", name, options, settings,
                     resources=resources)
    fresh_s = time.perf_counter() - start
    ingest_rate, fresh_rate = new / summary["seconds"], new / fresh_s
    return {"backbone": backbone, "base": base, "new": new, "ingest_s": summary["seconds"],
            "ingest_index_s": summary["index_seconds"], "ingest_img_per_s": round(ingest_rate, 2),
            "fresh_s": round(fresh_s, 2), "fresh_img_per_s": round(fresh_rate, 2),
            "extract_ratio": round(ingest_rate / fresh_rate, 3)}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def storage(work: Path, data: str, backbone: str, ingests: int, batch: int) -> dict:
    """Bytes on disk of a gallery's table after each of ``ingests`` ingests, over the table's size."""
    import lance

    uris = [str(Path(u).resolve()) for u in read_revisitop(data, "synthetic", read_r1m(Path(data) / "distractors"))
            .gallery.column("uri").to_pylist()]
    if ingests * batch > len(uris):
        raise SystemExit(f"at most {len(uris)} images")
    preset = yaml.safe_load((REPO / f"configs/backbone/{backbone}.yaml").read_text())
    out = {"ingests": ingests, "batch": batch}
    for label, keep in (("keep_3", 3), ("keep_all", 10**9)):
        settings = ExtractSettings(batch_size=4, keep_versions=keep)
        gallery = GalleryConfig(name=f"storage-{label}", root=str(work / "galleries"))
        ratios = []
        for i in range(ingests):
            manifest = work / f"storage-{i}.csv"
            manifest.write_text("uri\n" + "\n".join(uris[i * batch:(i + 1) * batch]) + "\n")
            ingest(GalleryConfig(**{**vars(gallery), "manifest": str(manifest)}), preset["name"], preset.get("options", {}),
                   settings, IndexConfig(factory="Flat"), PoolResources(intra_op_threads=available_cpus()))
            table = Path(Gallery.open(gallery.root, gallery.name).snapshot().table)
            newest = sum(f.file_size_bytes for fr in lance.dataset(str(table)).get_fragments() for f in fr.data_files())
            ratios.append(folder_bytes(table) / newest)
        out[label] = {"table_bytes": newest, "table_on_disk_bytes": folder_bytes(table),
                      "gallery_on_disk_bytes": folder_bytes(work / "galleries" / gallery.name),
                      "table_on_disk_ratio": round(ratios[-1], 3), "largest_ratio": round(max(ratios), 3),
                      "ratio_after_each": [round(r, 2) for r in ratios]}
    return out


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(1000, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def append(uri: str, start: int, n: int) -> None:
    schema = features_schema(DIM, 0, 0, "bench", {}, "bench")
    for s in range(start, start + n, 50_000):
        m = min(50_000, start + n - s)
        ids = np.arange(s, s + m, dtype=np.int64) * 7919 + 13
        commit_fragments(uri, schema, write_fragment(uri, features_to_table(
            schema, ids, vectors(m, s), np.zeros((m, 0, 0)), None, None, np.zeros(m))))


def index_growth(work: Path, n: int, factory: str) -> dict:
    out = {"vectors": n, "factory": factory}
    for label, fraction in (("+1%", 0.01), ("+10%", 0.10)):
        uri, directory = str(work / f"g{label}.lance"), str(work / f"index{label}")
        append(uri, 0, n)
        build_index(FeatureStore(uri), directory, factory, n_shards=2, train_size=50_000)
        append(uri, n, int(n * fraction))
        start = time.perf_counter()
        manifest, summary = update_index(FeatureStore(uri), directory, rebuild_fraction=0.2)
        add_s = time.perf_counter() - start
        assert summary["action"] == "add", summary
        start = time.perf_counter()
        build_index(FeatureStore(uri), str(work / f"rebuilt{label}"), factory, n_shards=2, train_size=50_000)
        rebuild_s = time.perf_counter() - start
        out[label] = {"added": summary["added"], "add_s": round(add_s, 2), "rebuild_s": round(rebuild_s, 2),
                      "add_speedup": round(rebuild_s / add_s, 2), "shards": len(manifest.shards)}
        shutil.rmtree(work / f"rebuilt{label}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-image extractor, 40 + 40 images, 20k vectors")
    parser.add_argument("--backbone", default="lite0_multiscale")
    parser.add_argument("--base", type=int, default=100)
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--factory", default="IVF1024,SQ8")
    parser.add_argument("--data", default="data/bench-synthetic")
    parser.add_argument("--ingests", type=int, default=20, help="storage: ingests into one gallery")
    parser.add_argument("--batch", type=int, default=16, help="storage: images an ingest")
    parser.add_argument("--only-storage", action="store_true", help="run the storage part alone")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.base, args.new, args.vectors = "tiny_image", 40, 40, 20_000
    init_ray(RayConfig())
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        result = {"benchmark": "ingest"}
        if not args.only_storage:
            result["extraction"] = extraction(work, args.data, args.backbone, args.base, args.new)
            result["index"] = index_growth(work, args.vectors, args.factory)
        else:
            synthetic_images(args.data)
        result["storage"] = storage(work, args.data, args.backbone, args.ingests, args.batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "extraction" in result:
        e = result["extraction"]
        print(f"ingest {e['ingest_img_per_s']} img/s vs fresh extraction {e['fresh_img_per_s']} img/s "
              f"(ratio {e['extract_ratio']}, index commit {e['ingest_index_s']} s)")
        for label in ("+1%", "+10%"):
            i = result["index"][label]
            print(f"index {label}: add {i['add_s']} s vs rebuild {i['rebuild_s']} s ({i['add_speedup']}x)")
    st = result["storage"]
    print(f"storage after {st['ingests']} ingests: table on disk / table = {st['keep_3']['table_on_disk_ratio']} "
          f"(largest {st['keep_3']['largest_ratio']}); keeping every version: {st['keep_all']['table_on_disk_ratio']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
