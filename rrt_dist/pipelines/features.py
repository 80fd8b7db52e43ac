"""Feature tables for a benchmark: extract what is missing (or changed), then open them for reading.

Tables live under ``<features_dir>/<benchmark>/<source>/<extractor fingerprint>/{query,gallery}.lance``,
where ``<source>`` names the dataset root the images come from, so two datasets of one benchmark type
(two folders, two synthetic roots) never share a table; distractors (shared by every benchmark that
appends them, e.g. R1M for ROxf and RPar) under ``<features_dir>/distractors/<source>/<fingerprint>/``.
Within a table each row records its image file's identity, and extraction redoes rows whose file changed.
A leave-one-out benchmark (queries = gallery) has one table, read as both.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from rrt_dist.datasets import Benchmark
from rrt_dist.features import config_fingerprint, create_extractor, extractor_reads_files
from rrt_dist.features.images import is_uri, join_location
from rrt_dist.runtime import init_ray
from rrt_dist.schema import ConfigError, DatasetLayoutError, ExtractSettings, PoolResources
from rrt_dist.store import FeatureStore, concat_globals

from .extract import extract_to_lance

log = logging.getLogger(__name__)


def extract_settings(backbone) -> ExtractSettings:
    """Pipeline settings from a ``backbone`` config (the fields the two share)."""
    return ExtractSettings(**{f.name: backbone[f.name] for f in fields(ExtractSettings) if f.name in backbone})


def absolute_location(location: str | Path) -> str:
    """A local path made absolute; a URI as it is (``Path`` would fold ``s3://`` into a path under the cwd)."""
    return str(location) if is_uri(str(location)) else str(Path(location).resolve())


def source_key(location: str | Path) -> str:
    """A short stable name for where images come from (a dataset root or a distractor folder)."""
    return hashlib.sha1(absolute_location(location).encode()).hexdigest()[:10]


def table_folder(extractor: str, options: dict, settings: ExtractSettings) -> str:
    """A table folder's name: the extractor's fingerprint, and how locals are stored when not fp16."""
    fp = config_fingerprint(extractor, **options)
    storage = {"fp16": "", "int8": "-int8", "pq": f"-pq{settings.local_pq_m}"}[settings.local_storage]
    return fp + storage


def table_paths(bench: Benchmark, features_dir: str | Path, extractor: str, options: dict,
                settings: ExtractSettings) -> dict[str, str]:
    """Where a benchmark's tables live under ``features_dir`` (a local path or a URI Lance writes to)."""
    fp = table_folder(extractor, options, settings)
    folder = join_location(features_dir, bench.name, source_key(bench.info["root"]), fp)
    paths = {"gallery": join_location(folder, "gallery.lance")}
    if not bench.exclude_self:
        paths["query"] = join_location(folder, "query.lance")
    if bench.n_distractors:
        uris = bench.gallery.filter(pa.compute.equal(bench.gallery.column("split"), "distractor")).column("uri")
        # Named by where the distractors live, so every benchmark that appends them shares one table.
        paths["distractor"] = join_location(features_dir, "distractors", source_key(Path(uris[0].as_py()).parent.parent),
                                            fp, "distractor.lance")
    return paths


def benchmark_manifests(bench: Benchmark) -> dict[str, pa.Table]:
    """The manifest behind each feature table of a benchmark: query, gallery, distractor."""
    splits = np.asarray(bench.gallery.column("split").to_pylist())
    return {"query": bench.queries,
            "gallery": bench.gallery.filter(pa.array(splits != "distractor")),
            "distractor": bench.gallery.filter(pa.array(splits == "distractor"))}


def ensure_tables(manifests: dict[str, pa.Table], paths: dict[str, str], extractor: str, options: dict,
                  settings: ExtractSettings, resources: PoolResources | None = None) -> dict[str, FeatureStore]:
    """Extract the rows of every table in ``paths`` that are not there yet (or whose image changed) on an actor
    pool of ``resources``; return the tables (pinned versions), each restricted to its manifest's ids.

    A ``query`` table keeps fp16 locals whatever ``settings.local_storage`` asks: queries are few (70 for
    R1M), and a codebook trained on them alone would be poor."""
    stores = {}
    for name, path in paths.items():
        table_settings = replace(settings, local_storage="fp16") if name == "query" else settings
        summary = extract_to_lance(manifests[name], path, extractor, options, table_settings,
                                   desc=f"extract {name}", resources=resources)
        if summary.errors:
            log.warning("%s: %d unreadable images recorded in %s-errors.lance, e.g. %s", name, summary.errors,
                        str(path).removesuffix(".lance"), summary.error_samples)
        stores[name] = FeatureStore(path, only=manifests[name].column("id").to_numpy())
        if len(stores[name]) == 0:
            raise DatasetLayoutError(path, f"no image of the {name} split could be read (see "
                                     f"{str(path).removesuffix('.lance')}-errors.lance)", "readable images")
    return stores


def ensure_features(bench: Benchmark, features_dir: str | Path, extractor: str, options: dict,
                    settings: ExtractSettings, resources: PoolResources | None = None) -> dict[str, FeatureStore]:
    """A benchmark's feature tables, extracted where missing (``query`` is the gallery's when they are one set); an
    extractor that reads descriptor files reads each image's file instead (imports released descriptors)."""
    manifests = benchmark_manifests(bench)
    if extractor_reads_files(extractor):
        reader = create_extractor(extractor, **options)
        manifests = {name: m.set_column(m.schema.get_field_index("uri"), m.schema.field("uri"),
                                        pa.array([reader.file_for(u) for u in m.column("uri").to_pylist()], pa.string()))
                     for name, m in manifests.items()}
    stores = ensure_tables(manifests, table_paths(bench, features_dir, extractor, options, settings), extractor,
                           options, settings, resources)
    stores.setdefault("query", stores["gallery"])
    return stores


def _undecodable(batch: dict) -> dict:
    """``map_batches`` function: the ids of the batch's images that do not decode, and why."""
    from rrt_dist.features.images import ImageError, load_image

    bad, reasons = [], []
    for image_id, uri in zip(batch["id"], batch["uri"]):
        try:
            load_image(uri)
        except ImageError as err:
            bad.append(int(image_id))
            reasons.append(str(err))
    return {"id": np.asarray(bad, np.int64), "reason": np.asarray(reasons, dtype=object)}


def decodable_rows(manifest: pa.Table, what: str) -> pa.Table:
    """``manifest`` without the rows whose image does not decode, each image decoded once by Ray Data tasks; the
    dropped ones are logged. For stages that read images straight from the manifest (training from images):
    one bad file would otherwise stop them when a batch first reaches it, possibly hours in."""
    import ray

    found = ray.data.from_arrow(manifest.select(["id", "uri"])).map_batches(_undecodable, batch_size=64).take_all()
    if not found:
        return manifest
    log.warning("%s: %d of %d images do not decode and are left out, e.g. %s", what, len(found), manifest.num_rows,
                "; ".join(row["reason"] for row in found[:3]))
    bad = np.asarray([row["id"] for row in found], np.int64)
    return manifest.filter(pa.array(~np.isin(manifest.column("id").to_numpy(), bad)))


def unreadable_counts(bench: Benchmark, stores: dict[str, FeatureStore]) -> dict[str, int]:
    """Images of each split that have no descriptors (recorded as unreadable): they score as misses."""
    return {name: int(manifest.num_rows - np.isin(manifest.column("id").to_numpy(), stores[name].ids).sum())
            for name, manifest in benchmark_manifests(bench).items() if name in stores}


def benchmark_features(cfg) -> tuple[Benchmark, dict[str, FeatureStore]]:
    """What every job starts with: the benchmark loaded (before Ray starts, so a layout error starts
    nothing), Ray up, its feature tables complete."""
    from rrt_dist.datasets import load_benchmark

    bench = load_benchmark(cfg.dataset, start_ray=partial(init_ray, cfg.ray))
    log.info("%s: %d queries, %d gallery images (%d distractors)", bench.name, bench.queries.num_rows,
             bench.gallery.num_rows, bench.n_distractors)
    init_ray(cfg.ray)
    return bench, backbone_features(cfg, bench, cfg.backbone)


def imported_features(cfg) -> tuple[Benchmark, dict[str, FeatureStore]]:
    """``rrt-dist import``: :func:`benchmark_features` for a backbone that reads released descriptor files
    (``backbone=delg_released``); a backbone that extracts from images is refused before anything starts."""
    if not extractor_reads_files(cfg.backbone.name):
        raise ConfigError(f"backbone.name={cfg.backbone.name!r} extracts descriptors from images; rrt-dist import reads "
                          f"released descriptor files: backbone=delg_released (or rrt-dist extract)")
    return benchmark_features(cfg)


def report_tables(bench: Benchmark, stores: dict[str, FeatureStore]) -> dict:
    """Each table's rows, version and location (printed), and the images it has no descriptors for."""
    missing = unreadable_counts(bench, stores)
    tables = {name: {"uri": s.uri, "version": s.version, "rows": len(s), "missing": missing.get(name, 0),
                     "fingerprint": s.fingerprint} for name, s in stores.items()}
    for name, t in tables.items():
        print(f"{name:<10} {t['rows']:>9} rows  {t['missing']:>6} without descriptors  version {t['version']:<4} "
              f"{t['uri']}")
    return tables


def backbone_features(cfg, bench: Benchmark, backbone) -> dict[str, FeatureStore]:
    """The benchmark's tables of the extractor a ``backbone`` config describes, extracted where missing (under
    ``cfg.features_dir``, on the ``cfg.ray.extract`` pool)."""
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(backbone.options, resolve=True)
    return ensure_features(bench, cfg.features_dir, backbone.name, options, extract_settings(backbone),
                           OmegaConf.to_object(cfg.ray.extract))


def patch_features(cfg, bench: Benchmark, stores: dict[str, FeatureStore]) -> dict[str, FeatureStore]:
    """The tables rerankers that read patch grids use: those of ``reranker.patch_backbone`` when set (so a
    structural row can stand beside GV and RRT rows, which read the run's own local features), else ``stores``."""
    from rrt_dist.rerank.methods import parse_method

    wants = any(m.reranker and "patches" in m.reranker.inputs for m in map(parse_method, cfg.reranker.methods))
    if not (wants and cfg.reranker.patch_backbone):
        return stores
    return backbone_features(cfg, bench, cfg.reranker.patch_backbone)


def global_matrix(stores: dict[str, FeatureStore], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids and global descriptors of the named tables (those that exist), concatenated."""
    return concat_globals([stores[n] for n in names if n in stores])


def training_pairs(cfg) -> str:
    """``train.pairs`` resolved: ``auto`` is the dataset's default (``selfsup`` for a folder gallery, else ``labels``)."""
    if cfg.train.pairs != "auto":
        return cfg.train.pairs
    from rrt_dist.datasets import get_dataset

    return get_dataset(cfg.dataset.name).default_pairs


def selfsup_training_set(cfg) -> tuple[pa.Table, str]:
    """The self-supervised training manifest (sources and their rendered views, labelled by source) and the
    location its sources come from: ``train.selfsup.images``, else the evaluated gallery (distractors left out)."""
    from omegaconf import OmegaConf

    from rrt_dist.datasets import load_benchmark
    from rrt_dist.datasets.selfsup import ViewSpec, selfsup_manifest, write_views

    conf = cfg.train.selfsup
    if conf.images:
        from rrt_dist.datasets.image_list import images_at

        location = conf.images
        sources = images_at(conf.images)
    else:
        location = cfg.dataset.root
        sources = benchmark_manifests(load_benchmark(cfg.dataset, start_ray=partial(init_ray, cfg.ray)))["gallery"]
    if conf.max_images and sources.num_rows > conf.max_images:
        keep = np.random.default_rng(cfg.train.seed).choice(sources.num_rows, conf.max_images, replace=False)
        sources = sources.take(np.sort(keep))
    spec = ViewSpec(views=conf.views, difficulty=conf.difficulty, seed=cfg.train.seed, max_size=conf.max_size)
    init_ray(cfg.ray)
    views = write_views(sources, join_location(conf.root, source_key(location), spec.fingerprint()), spec)
    log.info("self-supervised pairs: %d source images x %d views (%s)", sources.num_rows, conf.views,
             OmegaConf.to_container(conf, resolve=True))
    return selfsup_manifest(sources, views), location


def require_labels(manifest: pa.Table, pairs: str) -> pa.Table:
    if manifest.column("label").null_count:
        raise ValueError(f"train.pairs={pairs} needs a label for every training image, and "
                         f"{manifest.column('label').null_count} of {manifest.num_rows} have none: "
                         "train.pairs=selfsup trains without labels")
    return manifest


def training_features(cfg) -> tuple[pa.Table, FeatureStore]:
    """The training manifest (``train.pairs``: the dataset's labelled split, self-supervised views, or both) and
    its feature table, extracted where missing.

    The table lives at ``<features_dir>/<dataset>-<train|selfsup|mixed>/<source>/<fingerprint>/train.lance``.
    """
    from omegaconf import OmegaConf

    from rrt_dist.datasets import concat_manifests, load_training_set

    pairs = training_pairs(cfg)
    if pairs in ("labels", "mixed"):
        name, labelled = load_training_set(cfg.dataset, start_ray=partial(init_ray, cfg.ray))
        manifest, location = require_labels(labelled, pairs), cfg.dataset.root
    if pairs != "labels":
        selfsup, selfsup_location = selfsup_training_set(cfg)
        name = f"{cfg.dataset.name}-{pairs}"
        if pairs == "mixed":
            manifest, location = concat_manifests([manifest, selfsup]), f"{location}+{selfsup_location}"
        else:
            manifest, location = selfsup, selfsup_location
    init_ray(cfg.ray)
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    settings = extract_settings(cfg.backbone)
    path = join_location(cfg.features_dir, name, source_key(location), table_folder(cfg.backbone.name, options, settings),
                         "train.lance")
    store = ensure_tables({"train": manifest}, {"train": path}, cfg.backbone.name, options, settings,
                          OmegaConf.to_object(cfg.ray.extract))["train"]
    return manifest, store
