"""Benchmark readers: one ``Benchmark`` (manifests + ground truth + protocol) per dataset, behind one registry.

A :class:`DatasetEntry` maps a dataset name (``dataset.name``) to its config schema, its readers (the evaluated
split, the labelled training split) and what it supports; a new dataset is one reader module plus one
:func:`register_dataset` call below.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rrt_dist.schema import ConfigError, DatasetLayoutError

from .base import MANIFEST_SCHEMA, Benchmark, concat_manifests, make_manifest, stable_id
from .folder import read_folder
from .gldv2 import read_gldv2_retrieval, read_gldv2_train
from .metric_learning import read_cars196, read_cub200, read_sop
from .msls import read_msls
from .revisitop import read_r1m, read_revisitop
from .synthetic import synthetic_as_metric_learning

__all__ = ["Benchmark", "DatasetLayoutError", "MANIFEST_SCHEMA", "DatasetEntry", "register_dataset", "get_dataset",
           "list_datasets", "load_benchmark", "load_distractors", "load_training_set", "synthetic_spec", "make_manifest", "concat_manifests", "stable_id", "read_revisitop", "read_r1m",
           "read_gldv2_retrieval", "read_gldv2_train", "read_msls", "read_sop", "read_cub200", "read_cars196",
           "read_folder"]


def synthetic_spec(cfg):
    from dataclasses import fields

    from .options import SyntheticSpec

    return SyntheticSpec(**{f.name: cfg[f.name] for f in fields(SyntheticSpec) if f.name in cfg})


def load_distractors(cfg):
    """The distractor manifest named by ``cfg.distractors`` (None for ``none``)."""
    d = cfg.distractors
    if d.name == "none":
        return None
    if d.name == "r1m":
        if not d.root:
            raise ConfigError("dataset.distractors.root must point at the revisitop1m folder")
        return read_r1m(d.root, d.limit)
    if d.name == "synthetic":
        if cfg.name != "synthetic" and not d.root:
            raise ConfigError("synthetic distractors need dataset.distractors.root (or dataset=synthetic)")
        return read_r1m(d.root or Path(cfg.root) / "distractors", d.limit)
    raise ConfigError(f"dataset.distractors.name={d.name!r} is not one of none, r1m, synthetic")


def _generate(cfg, start_ray) -> None:
    """Render the synthetic benchmark if it is not on disk yet (in Ray tasks, after ``start_ray()``, when given)."""
    from .generate import generate_synthetic

    generate_synthetic(synthetic_spec(cfg), cfg.root, start_ray=start_ray)


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    schema: str                          # its config schema: rrt_dist.datasets.options.DATASET_SCHEMAS[schema]
    read: Callable                       # dataset cfg -> Benchmark (the evaluated split)
    read_training: Callable | None = None   # dataset cfg -> labelled training manifest (None: no training split)
    distractors: bool = False            # revisitop layout: dataset/distractors (r1m, synthetic) may be appended
    default_pairs: str = "labels"        # what train.pairs=auto trains RRT on: labels | selfsup (views of its images)
    validation_split: bool = False       # RRT validates on its own split (else on labels held out of training)
    generated: bool = False              # rendered on first use (from the config's generator parameters)


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry) -> None:
    if entry.name in _REGISTRY:
        raise ValueError(f"dataset {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset(name: str) -> DatasetEntry:
    """The registry entry of ``name``; an unknown one raises ConfigError naming the known ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"dataset.name={name!r} is not a dataset; known: {', '.join(list_datasets())}")
    return _REGISTRY[name]


def load_benchmark(cfg, start_ray=None) -> Benchmark:
    """The benchmark a ``dataset`` config names; the synthetic one is generated on first use (``start_ray()``, when
    given, is called only when there is something to render, which then runs in Ray tasks). A split that lists no
    image is a layout error."""
    entry = get_dataset(cfg.name)
    if entry.generated:
        _generate(cfg, start_ray)
    if not entry.distractors and load_distractors(cfg) is not None:
        raise ConfigError(f"dataset/distractors: distractors are only defined for revisitop-style benchmarks "
                          f"({', '.join(n for n in list_datasets() if _REGISTRY[n].distractors)}), not {cfg.name}")
    bench = entry.read(cfg)
    if cfg.get("r_includes_query"):
        bench.protocol.r_includes_query = True
    for split, table in (("gallery", bench.gallery), ("query", bench.queries)):
        if table.num_rows == 0:
            raise DatasetLayoutError(bench.info.get("root", cfg.root), f"the {split} split of {bench.name} lists no image",
                                     "at least one query and one gallery image")
    return bench


def load_training_set(cfg, start_ray=None):
    """``(name, manifest)``: the labelled training images of a dataset config (labels = landmark / class)."""
    entry = get_dataset(cfg.name)
    if entry.read_training is None:
        raise ConfigError(f"dataset {cfg.name!r} has no training split; train on one of "
                          f"{', '.join(n for n in list_datasets() if _REGISTRY[n].read_training)}")
    if entry.generated:
        _generate(cfg, start_ray)
    return f"{cfg.name}-train", entry.read_training(cfg)


def _read_synthetic(cfg) -> Benchmark:
    split = "val" if cfg.split == "val" else "test"
    if cfg.split == "test_classes" and load_distractors(cfg) is not None:
        raise ConfigError("dataset.split=test_classes is a metric-learning set: it takes no distractors")
    name = "synthetic" if split == "test" else "synthetic-val"
    bench = read_revisitop(cfg.root, name, load_distractors(cfg))
    bench.name = name
    return synthetic_as_metric_learning(bench, cfg.root) if cfg.split == "test_classes" else bench


# synthetic: its train split; gldv2: the RRT paper's train_clean subset; sop / cub200 / cars196: their train split;
# folder: every labelled gallery image (with no labels, self-supervised views).
register_dataset(DatasetEntry("synthetic", "synthetic", _read_synthetic,
                              lambda cfg: read_folder(Path(cfg.root) / "train").gallery,
                              distractors=True, validation_split=True, generated=True))
for _name in ("roxford5k", "rparis6k"):
    register_dataset(DatasetEntry(_name, "revisitop", lambda cfg: read_revisitop(cfg.root, cfg.name, load_distractors(cfg)),
                                  distractors=True))
register_dataset(DatasetEntry("gldv2", "gldv2", lambda cfg: read_gldv2_retrieval(cfg.root),
                              lambda cfg: read_gldv2_train(cfg.root, cfg.train_landmarks, cfg.train_min_images,
                                                           cfg.train_max_images, cfg.train_seed)))
register_dataset(DatasetEntry("msls", "msls", lambda cfg: read_msls(cfg.root, list(cfg.cities), cfg.radius_m,
                                                                    cfg.subtask)))
for _name, _reader in (("sop", read_sop), ("cub200", read_cub200), ("cars196", read_cars196)):
    register_dataset(DatasetEntry(_name, "metric_learning", lambda cfg, read=_reader: read(cfg.root, cfg.split),
                                  lambda cfg, read=_reader: read(cfg.root, "train").gallery))
register_dataset(DatasetEntry("folder", "folder", lambda cfg: read_folder(cfg.root, cfg.queries),
                              lambda cfg: read_folder(cfg.root).gallery, default_pairs="selfsup"))
