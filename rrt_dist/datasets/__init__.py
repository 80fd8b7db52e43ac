"""Benchmark readers: one ``Benchmark`` (manifests + ground truth + protocol) per dataset."""
from __future__ import annotations

from pathlib import Path

from rrt_dist.schema import DatasetLayoutError

from .base import MANIFEST_SCHEMA, Benchmark, concat_manifests, make_manifest, stable_id
from .folder import read_folder
from .gldv2 import read_gldv2_retrieval, read_gldv2_train
from .metric_learning import read_cars196, read_cub200, read_sop
from .msls import read_msls
from .revisitop import read_r1m, read_revisitop
from .synthetic import synthetic_as_metric_learning

__all__ = ["Benchmark", "DatasetLayoutError", "MANIFEST_SCHEMA", "load_benchmark", "load_distractors",
           "load_training_set", "synthetic_spec", "make_manifest", "concat_manifests", "stable_id", "read_revisitop", "read_r1m",
           "read_gldv2_retrieval", "read_gldv2_train", "read_msls", "read_sop", "read_cub200", "read_cars196",
           "read_folder"]


def synthetic_spec(cfg):
    from dataclasses import fields

    from .synthetic import SyntheticSpec

    return SyntheticSpec(**{f.name: cfg[f.name] for f in fields(SyntheticSpec) if f.name in cfg})


def load_distractors(cfg):
    """The distractor manifest named by ``cfg.distractors`` (None for ``none``)."""
    d = cfg.distractors
    if d.name == "none":
        return None
    if d.name == "r1m":
        if not d.root:
            raise ValueError("dataset.distractors.root must point at the revisitop1m folder")
        return read_r1m(d.root, d.limit)
    if d.name == "synthetic":
        if cfg.name != "synthetic" and not d.root:
            raise ValueError("synthetic distractors need dataset.distractors.root (or dataset=synthetic)")
        return read_r1m(d.root or Path(cfg.root) / "distractors", d.limit)
    raise ValueError(f"unknown dataset.distractors.name {d.name!r}; expected none, r1m or synthetic")


def _generate(cfg, start_ray) -> None:
    """Render the synthetic benchmark if it is not on disk yet (in Ray tasks, after ``start_ray()``, when given)."""
    from .generate import generate_synthetic

    generate_synthetic(synthetic_spec(cfg), cfg.root, start_ray=start_ray)


def load_benchmark(cfg, start_ray=None) -> Benchmark:
    """The benchmark a ``dataset`` config names; the synthetic one is generated on first use (``start_ray()``, when
    given, is called only when there is something to render, which then runs in Ray tasks). A split that lists no
    image is a layout error."""
    bench = _read_benchmark(cfg, start_ray)
    if cfg.get("r_includes_query"):
        bench.protocol.r_includes_query = True
    for split, table in (("gallery", bench.gallery), ("query", bench.queries)):
        if table.num_rows == 0:
            raise DatasetLayoutError(bench.info.get("root", cfg.root), f"the {split} split of {bench.name} lists no image",
                                     "at least one query and one gallery image")
    return bench


def _read_benchmark(cfg, start_ray) -> Benchmark:
    name = cfg.name
    if name == "synthetic":
        _generate(cfg, start_ray)
        if cfg.split not in ("test", "val", "test_classes"):
            raise ValueError(f"dataset.split must be test, val or test_classes, got {cfg.split!r}")
        split = "val" if cfg.split == "val" else "test"
        if cfg.split == "test_classes" and load_distractors(cfg) is not None:
            raise ValueError("split=test_classes is a metric-learning set: it takes no distractors")
        bench = read_revisitop(cfg.root, "synthetic" if split == "test" else "synthetic-val", load_distractors(cfg))
        bench.name = "synthetic" if split == "test" else "synthetic-val"
        return synthetic_as_metric_learning(bench, cfg.root) if cfg.split == "test_classes" else bench
    if name in ("roxford5k", "rparis6k"):
        return read_revisitop(cfg.root, name, load_distractors(cfg))
    if load_distractors(cfg) is not None:
        raise ValueError(f"distractors are only defined for revisitop-style benchmarks, not {name}")
    readers = {
        "gldv2": lambda: read_gldv2_retrieval(cfg.root),
        "msls": lambda: read_msls(cfg.root, list(cfg.cities), cfg.radius_m, cfg.subtask),
        "sop": lambda: read_sop(cfg.root, cfg.split),
        "cub200": lambda: read_cub200(cfg.root, cfg.split),
        "cars196": lambda: read_cars196(cfg.root, cfg.split),
        "folder": lambda: read_folder(cfg.root),
    }
    if name not in readers:
        raise ValueError(f"unknown dataset {name!r}; expected one of synthetic, roxford5k, rparis6k, "
                         f"{', '.join(readers)}")
    return readers[name]()


def load_training_set(cfg, start_ray=None):
    """``(name, manifest)``: the labelled training images of a dataset config (labels = landmark / class).

    synthetic: its train split; gldv2: the RRT paper's ``train_clean`` subset; sop / cub200 / cars196:
    their train split; folder: every labelled gallery image.
    """
    name = cfg.name
    if name == "synthetic":
        _generate(cfg, start_ray)
        return "synthetic-train", read_folder(Path(cfg.root) / "train").gallery
    readers = {
        "gldv2": lambda: read_gldv2_train(cfg.root, cfg.train_landmarks, cfg.train_min_images, cfg.train_max_images,
                                          cfg.train_seed),
        "sop": lambda: read_sop(cfg.root, "train").gallery,
        "cub200": lambda: read_cub200(cfg.root, "train").gallery,
        "cars196": lambda: read_cars196(cfg.root, "train").gallery,
        "folder": lambda: read_folder(cfg.root).gallery,
    }
    if name not in readers:
        raise ValueError(f"dataset {name!r} has no training split; train on one of synthetic, {', '.join(readers)}")
    return f"{name}-train", readers[name]()
