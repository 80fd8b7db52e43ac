"""Structured configs (dataclasses) behind the Hydra groups in ``configs/``.

Each YAML option extends one of these schemas, so a mistyped or unknown key fails at start-up
with Hydra's message naming the key and the schema. Registered in Hydra's ConfigStore on import.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class RayConfig:
    """``address: null`` starts an embedded Ray sized to this machine; ``auto`` or ``ray://host:port`` joins a cluster."""
    address: Optional[str] = None
    num_cpus: Optional[int] = None          # embedded only; default: the CPUs this process may use
    num_gpus: Optional[int] = None          # embedded only; default: what Ray detects
    object_store_memory: Optional[int] = None
    namespace: str = "rrt-dist"


@dataclass
class DistractorsConfig:
    """Distractors appended after the gallery: ``none``, ``r1m`` (revisitop1m layout) or ``synthetic``."""
    name: str = "none"
    root: Optional[str] = None              # r1m: the revisitop1m folder; synthetic: <dataset.root>/distractors
    limit: Optional[int] = None             # keep the first N (partial runs)


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
    train_landmarks: Optional[int] = 12000   # the RRT paper's training subset
    train_min_images: int = 10
    train_max_images: Optional[int] = 500
    train_seed: int = 0


@dataclass
class MSLSConfig(DatasetConfig):
    name: str = "msls"
    cities: list[str] = field(default_factory=lambda: ["cph", "sf"])
    radius_m: float = 25.0
    subtask: str = "all"


@dataclass
class MetricLearningConfig(DatasetConfig):
    """sop / cub200 / cars196."""
    split: str = "test"


@dataclass
class FolderConfig(DatasetConfig):
    name: str = "folder"


def _synthetic_config() -> type:
    """``SyntheticConfig``: DatasetConfig + ``split`` + every generator parameter of ``SyntheticSpec``.

    Built from the spec's fields so the two never drift apart.
    """
    from rrt_dist.datasets.synthetic import SyntheticSpec

    hints = get_type_hints(SyntheticSpec)
    spec_fields = [(f.name, hints[f.name], field(default=f.default)) for f in fields(SyntheticSpec)]
    return make_dataclass("SyntheticConfig", [
        ("name", str, field(default="synthetic")),
        ("root", str, field(default="data/synthetic")),
        ("split", str, field(default="test")),     # test | val (val is for model selection during training)
        *spec_fields,
    ], bases=(DatasetConfig,))


SyntheticConfig = _synthetic_config()


@dataclass
class BackboneConfig:
    """Descriptor extractor (a name from the ``rrt_dist.features`` registry), its options and how it is run.

    ``options`` go to the extractor's own config dataclass, which rejects unknown keys by name.
    """
    name: str = "tiny-image"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16                     # images per actor call / written fragment
    num_actors: Optional[int] = None         # default: one per GPU, else 1
    torch_threads: Optional[int] = None      # default: the node's CPUs / actors
    commit_every: int = 256                  # images per Lance commit


@dataclass
class IndexConfig:
    """Global search: a sharded FAISS index (inner product) served by one Ray actor per shard."""
    factory: str = "Flat"                    # FAISS index_factory string, or "auto" (from the memory budget)
    k: Optional[int] = None                  # neighbours kept per query (None: the whole gallery, exact protocol)
    n_shards: int = 1
    params: Optional[str] = None             # search-time parameters, e.g. "nprobe=32" or "efSearch=256"
    memory_budget_gb: float = 8.0            # for factory=auto
    train_size: int = 200_000                # training sample for IVF / PQ
    use_gpu: Optional[bool] = None           # default: when every shard can have a GPU
    with_distractors: bool = True            # index the benchmark's distractors with its gallery
    qe_n: int = 0                            # alpha-QE neighbours (0 = off; the RRT paper tunes n=2)
    qe_alpha: float = 0.3
    dba_n: int = 0                           # database-side augmentation neighbours (0 = off)
    dba_alpha: float = 0.3
    dir: str = "data/indexes"


@dataclass
class RerankerConfig:
    """Which rows the evaluation reports (the RRT paper's Tables 1-3) and how the top-K is reranked."""
    methods: list[str] = field(default_factory=lambda: ["global"])   # global | aqe | gv | rrt | aqe+rrt
    k: int = 100                             # top-K reranked (the paper: 100, 200, 400)
    checkpoint: Optional[str] = None         # RRT weights for rrt rows: a path, or "train" (train_rrt first)
    aqe_n: int = 2                           # alpha-QE as tuned in the paper
    aqe_alpha: float = 0.3
    num_actors: int = 1                      # reranker actors (0: in-process)
    protocol_junk_removal: bool = True       # revisitop: rerank each protocol with its junk removed first
    gv: dict[str, Any] = field(default_factory=dict)   # GVConfig options


@dataclass
class TrainConfig:
    """RRT training with Ray Train (defaults: the paper's DELG / GLDv2 setting).

    A run is named ``name`` (default: derived from the dataset, backbone and these settings) under
    ``storage_path``; rerunning a name resumes from its latest checkpoint, and a finished run is reused.
    """
    epochs: int = 15
    lr: float = 1e-4
    weight_decay: float = 5e-4               # 4e-4 in the SOP setting
    batch_size: int = 12                     # triplets per step per worker (the global batch scales with workers)
    grad_clip: Optional[float] = 0.1
    milestones: list[int] = field(default_factory=list)   # MultiStepLR: epochs where lr *= gamma
    gamma: float = 0.1
    seed: int = 0
    k: int = 100                             # global neighbours per training image (pair sampling)
    min_positives: int = 5                   # same-label images an anchor needs among them
    positive_scope: str = "topk"             # topk (GLDv2: positives from the top-k) | label (SOP: any same label)
    max_local: Optional[int] = None          # locals per image fed to RRT, best first (None: all)
    model: dict[str, Any] = field(default_factory=dict)   # RRTConfig overrides (use_global, position_encoding, ...)
    embedding_init_std: float = 0.02         # initial segment / scale embeddings (N(0,1) stalls training)
    match_init: float = 0.0                  # query / key projections start as match_init x identity (0: random)
    joint_stages: list[str] = field(default_factory=list)  # [frozen, finetune]: dense-grid backbone + RRT from images
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # joint: random crop's share of the image area
    data_cpus: float = 0.5                   # joint: CPUs per Ray Data decode task (beside the workers' CPUs)
    val_k: int = 100                         # top-K reranked when validating each epoch
    val_holdout_labels: int = 50             # datasets without a validation split: labels held out of training
    num_workers: int = 2
    cpus_per_worker: float = 1
    use_gpu: Optional[bool] = None           # default: when the cluster has a GPU per worker
    name: Optional[str] = None
    storage_path: str = "data/train"         # local folder or URI (s3://, gs://) shared by the workers
    keep_checkpoints: int = 2                # best by validation score; the latest is always kept too
    max_failures: int = 3                    # worker failures survived (restart from the latest checkpoint)
    fail_at_epoch: Optional[int] = None      # fault injection (tests): one worker dies once at this epoch


@dataclass
class Config:
    dataset: Any = MISSING
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    features_dir: str = "data/features"      # Lance feature tables: <features_dir>/<benchmark>/<fingerprint>/
    output_dir: str = "${hydra:runtime.output_dir}"


DATASET_SCHEMAS = {
    "revisitop": RevisitopConfig, "gldv2": GLDv2Config, "msls": MSLSConfig,
    "metric_learning": MetricLearningConfig, "folder": FolderConfig, "synthetic": SyntheticConfig,
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, schema in DATASET_SCHEMAS.items():
        cs.store(group="dataset", name=f"schema_{name}", node=schema)
    for group, schema in (("backbone", BackboneConfig), ("index", IndexConfig), ("reranker", RerankerConfig),
                          ("train", TrainConfig), ("ray", RayConfig)):
        cs.store(group=group, name="schema", node=schema)
    cs.store(group="dataset/distractors", name="schema", node=DistractorsConfig)


register()
