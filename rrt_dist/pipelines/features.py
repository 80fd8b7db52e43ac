"""Feature tables for a benchmark: extract what is missing, then open them for reading.

Tables live under ``<features_dir>/<benchmark>/<extractor fingerprint>/{query,gallery}.lance``;
distractors (shared by every benchmark that appends them, e.g. R1M for ROxf and RPar) under
``<features_dir>/distractors/<name>/<fingerprint>/distractor.lance``.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from rrt_dist.datasets import Benchmark
from rrt_dist.features import config_fingerprint
from rrt_dist.store import FeatureStore, concat_globals

from .extract import ExtractSettings, extract_to_lance

log = logging.getLogger(__name__)


def extract_settings(backbone) -> ExtractSettings:
    """Pipeline settings from a ``backbone`` config."""
    return ExtractSettings(batch_size=backbone.batch_size, num_actors=backbone.num_actors,
                           torch_threads=backbone.torch_threads, commit_every=backbone.commit_every)


def table_paths(bench: Benchmark, features_dir: str | Path, extractor: str, options: dict) -> dict[str, Path]:
    fp = config_fingerprint(extractor, **options)
    root = Path(features_dir)
    paths = {"query": root / bench.name / fp / "query.lance", "gallery": root / bench.name / fp / "gallery.lance"}
    if bench.n_distractors:
        uris = bench.gallery.filter(pa.compute.equal(bench.gallery.column("split"), "distractor")).column("uri")
        # Named by where the distractors live, so every benchmark that appends them shares one table.
        where = hashlib.sha1(str(Path(uris[0].as_py()).parent.parent).encode()).hexdigest()[:10]
        paths["distractor"] = root / "distractors" / where / fp / "distractor.lance"
    return paths


def benchmark_manifests(bench: Benchmark) -> dict[str, pa.Table]:
    """The manifest behind each feature table of a benchmark: query, gallery, distractor."""
    splits = np.asarray(bench.gallery.column("split").to_pylist())
    return {"query": bench.queries,
            "gallery": bench.gallery.filter(pa.array(splits != "distractor")),
            "distractor": bench.gallery.filter(pa.array(splits == "distractor"))}


def ensure_tables(manifests: dict[str, pa.Table], paths: dict[str, Path], extractor: str, options: dict,
                  settings: ExtractSettings) -> dict[str, FeatureStore]:
    """Extract the rows of every table in ``paths`` that are not there yet; return the tables (pinned versions)."""
    stores = {}
    for name, path in paths.items():
        summary = extract_to_lance(manifests[name], path, extractor, options, settings, desc=f"extract {name}")
        if summary.errors:
            log.warning("%s: %d unreadable images recorded in %s-errors.lance, e.g. %s", name, summary.errors,
                        str(path).removesuffix(".lance"), summary.error_samples)
        stores[name] = FeatureStore(path)
    return stores


def ensure_features(bench: Benchmark, features_dir: str | Path, extractor: str, options: dict,
                    settings: ExtractSettings) -> dict[str, FeatureStore]:
    """A benchmark's feature tables, extracted where missing."""
    return ensure_tables(benchmark_manifests(bench), table_paths(bench, features_dir, extractor, options), extractor,
                         options, settings)


def benchmark_features(cfg) -> tuple[Benchmark, dict[str, FeatureStore]]:
    """What every job starts with: Ray up, the benchmark loaded, its feature tables complete."""
    from omegaconf import OmegaConf

    from rrt_dist.datasets import load_benchmark
    from rrt_dist.runtime import init_ray

    init_ray(cfg.ray)
    bench = load_benchmark(cfg.dataset)
    log.info("%s: %d queries, %d gallery images (%d distractors)", bench.name, bench.queries.num_rows,
             bench.gallery.num_rows, bench.n_distractors)
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    return bench, ensure_features(bench, cfg.features_dir, cfg.backbone.name, options, extract_settings(cfg.backbone))


def global_matrix(stores: dict[str, FeatureStore], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids and global descriptors of the named tables (those that exist), concatenated."""
    return concat_globals([stores[n] for n in names if n in stores])


def training_features(cfg) -> tuple[pa.Table, FeatureStore]:
    """The labelled training manifest of ``cfg.dataset`` and its feature table, extracted where missing.

    The table lives at ``<features_dir>/<dataset>-train/<fingerprint>/train.lance``.
    """
    from omegaconf import OmegaConf

    from rrt_dist.datasets import load_training_set

    name, manifest = load_training_set(cfg.dataset)
    options = OmegaConf.to_container(cfg.backbone.options, resolve=True)
    path = Path(cfg.features_dir) / name / config_fingerprint(cfg.backbone.name, **options) / "train.lance"
    store = ensure_tables({"train": manifest}, {"train": path}, cfg.backbone.name, options,
                          extract_settings(cfg.backbone))["train"]
    return manifest, store
