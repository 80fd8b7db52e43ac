"""What a ``dataset`` config holds, per kind of benchmark: plain dataclasses (no reader code), so the config schema
and the dataset registry read them without the readers. ``configs/dataset/<name>.yaml`` extends
``schema_<kind>`` (:data:`DATASET_SCHEMAS`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Optional, get_type_hints

from omegaconf import MISSING

from rrt_dist.schema import bounded, choice

FORMAT_VERSION = 1   # of the synthetic renderer: bump when rendering changes, so stale data on disk is regenerated


@dataclass(frozen=True)
class SyntheticSpec:
    """The synthetic benchmark's generator parameters (``rrt_dist.datasets.synthetic``); ``dataset=synthetic`` takes
    each as ``dataset.<name>``."""
    seed: int = 0
    n_landmarks: int = bounded(50, ge=1)            # test landmarks (one query each)
    n_val_landmarks: int = bounded(20, ge=0)
    n_train_landmarks: int = bounded(60, ge=0)
    views_per_landmark: int = bounded(8, ge=1)      # gallery views per test / val landmark
    train_views_per_landmark: int = bounded(10, ge=1)
    queries_per_landmark: int = bounded(1, ge=1)
    n_distractors: int = bounded(500, ge=0)
    family_size: int = bounded(4, ge=1)             # landmarks sharing one style (global look-alikes)
    view_width: int = bounded(384, ge=32)
    view_height: int = bounded(288, ge=32)
    junk_below: float = bounded(0.2, ge=0, le=1)
    hard_below: float = bounded(0.5, ge=0, le=1)
    hard_difficulty: float = bounded(0.55, ge=0, le=1)
    jpeg_quality: int = bounded(90, ge=1, le=100)

    def fingerprint(self) -> str:
        payload = json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


@dataclass
class DistractorsConfig:
    """Distractors appended after the gallery: ``none``, ``r1m`` (revisitop1m layout) or ``synthetic``."""
    name: str = "none"
    root: Optional[str] = None              # r1m: the revisitop1m folder; synthetic: <dataset.root>/distractors
    limit: Optional[int] = bounded(None, ge=1)      # keep the first N (partial runs)


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = MISSING
    distractors: DistractorsConfig = field(default_factory=DistractorsConfig)


@dataclass
class RevisitopConfig(DatasetConfig):
    """roxford5k / rparis6k: ``root`` holds gnd_<name>.pkl and jpg/."""


@dataclass
class GLDv2Config(DatasetConfig):
    name: str = "gldv2"
    train_landmarks: Optional[int] = bounded(12000, ge=1)   # the RRT paper's training subset
    train_min_images: int = bounded(10, ge=1)
    train_max_images: Optional[int] = bounded(500, ge=1)
    train_seed: int = 0


@dataclass
class MSLSConfig(DatasetConfig):
    name: str = "msls"
    cities: list[str] = field(default_factory=lambda: ["cph", "sf"])
    radius_m: float = bounded(25.0, gt=0)
    subtask: str = "all"


@dataclass
class MetricLearningConfig(DatasetConfig):
    """sop / cub200 / cars196."""
    split: str = choice("test", "test", "train")
    r_includes_query: bool = False      # RP / MAP@R as the ViT-reranking reference computes them (R counts the query)


@dataclass
class FolderConfig(DatasetConfig):
    name: str = "folder"
    # the queries file in root (path and label or positives); another file (e.g. a validation query set) over the
    # same gallery shares its feature tables and its trained rerankers
    queries: str = "queries.csv"


def _synthetic_config() -> type:
    """``SyntheticConfig``: DatasetConfig + ``split`` + every generator parameter of :class:`SyntheticSpec`, with its
    bounds (built from the spec's fields, so the two never drift apart)."""
    hints = get_type_hints(SyntheticSpec)
    return make_dataclass("SyntheticConfig", [
        ("name", str, field(default="synthetic")),
        ("root", str, field(default="data/synthetic")),
        # val is for model selection during training; test_classes: the test split as a metric-learning set
        ("split", str, choice("test", "test", "val", "test_classes")),
        *[(f.name, hints[f.name], field(default=f.default, metadata=f.metadata)) for f in fields(SyntheticSpec)],
    ], bases=(DatasetConfig,))


SyntheticConfig = _synthetic_config()

DATASET_SCHEMAS = {
    "revisitop": RevisitopConfig, "gldv2": GLDv2Config, "msls": MSLSConfig,
    "metric_learning": MetricLearningConfig, "folder": FolderConfig, "synthetic": SyntheticConfig,
}
