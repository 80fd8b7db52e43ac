"""Structured configs (dataclasses) behind the Hydra groups in ``configs/``.

Each YAML option extends one of these schemas, so a mistyped or unknown key fails at start-up
with Hydra's message naming the key and the schema. Registered in Hydra's ConfigStore on import.

Numeric options carry their bounds as field metadata (:func:`bounded`, :func:`choice`);
:func:`validate_config` checks a composed config against them before any work starts, and
refuses a bad value with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import os
from importlib.resources import files
from pathlib import Path
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

# ConfigError is re-exported for callers of config
from rrt_dist.datasets.options import DATASET_SCHEMAS, DistractorsConfig
from rrt_dist.schema import (AQEConfig, ConfigError, ExtractSettings, MetricSettings, PoolResources,  # noqa: F401
                             RRTConfig, SearchResources, StageResources, TrainSettings, bounded, choice, renamed)

CONFIG_DIR = Path(str(files("rrt_dist.configs")))   # the Hydra config groups (configs/ in the checkout)

_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_TEST = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
               "lt": lambda v, b: v < b}


def _check_field(key: str, value, meta) -> None:
    if value is None:
        return
    if "renamed" in meta:
        raise ConfigError(f"{key} is no longer an option: use {meta['renamed']}")
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    for v in values:
        for name, bound in meta.get("bounds", {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not _BOUND_TEST[name](v, bound):
                raise ConfigError(f"{key}={OmegaConf.to_container(value) if isinstance(value, ListConfig) else value!r}"
                                  f" is out of range: must be {_BOUND_TEXT[name]} {bound}")
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{key}={v!r} is not one of {', '.join(map(str, meta['choices']))}")


def _check_node(prefix: str, node) -> None:
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    for f in fields(schema):
        if f.name not in node or OmegaConf.is_missing(node, f.name):
            continue
        value = node[f.name]
        if isinstance(value, DictConfig):
            _check_node(f"{prefix}{f.name}.", value)
        else:
            _check_field(f"{prefix}{f.name}", value, f.metadata)


def validate_config(cfg) -> None:
    """Refuse values no stage can work with (bounds and choices of the schemas, and what only the
    registries know: reranker methods, extractor options, FAISS factory strings) with a
    :class:`ConfigError` naming the key. Cheap: runs before Ray starts or any data is touched."""
    for section in ("dataset", "backbone", "index", "reranker", "train", "ray"):
        if section in cfg:
            _check_node(f"{section}.", cfg[section])
    from rrt_dist.features import check_extractor_options

    for key in ("backbone", "reranker.patch_backbone"):
        backbone = OmegaConf.select(cfg, key)
        if backbone:
            check_extractor_options(backbone.name, OmegaConf.to_container(backbone.options, resolve=True), key)
    from rrt_dist.datasets import get_dataset
    from rrt_dist.datasets.options import DATASET_SCHEMAS
    from rrt_dist.rerank.methods import check_methods

    if "dataset" in cfg and not OmegaConf.is_missing(cfg.dataset, "name"):
        schema = DATASET_SCHEMAS[get_dataset(cfg.dataset.name).schema]
        if not isinstance(OmegaConf.get_type(cfg.dataset), type) or not issubclass(OmegaConf.get_type(cfg.dataset), schema):
            raise ConfigError(f"dataset.name={cfg.dataset.name!r} needs the {schema.__name__} schema (a dataset preset "
                              f"of that kind: dataset={cfg.dataset.name})")

    check_methods(list(cfg.reranker.methods), cfg.reranker.qualitative_row)
    rerank = OmegaConf.select(cfg, "search.rerank")
    if rerank:
        from rrt_dist.rerank.methods import list_rerankers

        if rerank not in list_rerankers():
            raise ConfigError(f"search.rerank={rerank!r} is not a reranker; known: {', '.join(list_rerankers())}")
    from rrt_dist.index.core import check_factory

    check_factory(cfg.index.factory)
    root = cfg.get("storage_root")
    if root is not None and (not root or (root.endswith("/") and root != "/")):
        # interpolated into every stored path: "s3://b/x/" would give "s3://b/x//features", another key
        raise ConfigError(f"storage_root={root!r}: give a folder or URI without a trailing '/'")


@dataclass
class RayConfig:
    """``address: null`` starts an embedded Ray sized to this machine; ``auto`` or ``ray://host:port`` joins a cluster."""
    address: Optional[str] = None
    num_cpus: Optional[int] = bounded(None, ge=1)   # embedded only; default: the CPUs this process may use
    num_gpus: Optional[int] = bounded(None, ge=0)   # embedded only; default: what Ray detects
    object_store_memory: Optional[int] = bounded(None, ge=1)
    # embedded only: the dashboard (progress of every stage, http://127.0.0.1:8265). null: only for a job that trains,
    # whose Ray Train placement-group cleaner polls the state API the dashboard serves (without it, a warning every
    # second); otherwise off, which starts lighter on a loaded machine
    dashboard: Optional[bool] = None
    start_attempts: int = bounded(3, ge=1)          # embedded only: a start that times out (a loaded machine) is retried
    namespace: str = "rrt-dist"
    # What each stage's actors ask for (see StageResources): where work runs, never what it computes.
    extract: PoolResources = field(default_factory=PoolResources)      # extraction actor pool
    # one actor per index shard; reserving no CPU by default: idle between query batches, and a small machine's
    # CPUs go to extraction and reranking running beside it
    search: SearchResources = field(default_factory=lambda: SearchResources(num_cpus=0))
    rerank: StageResources = field(default_factory=StageResources)     # reranker.num_actors actors
    train: StageResources = field(default_factory=StageResources)      # each of train.num_workers workers


@dataclass
class BackboneConfig(ExtractSettings):
    """Descriptor extractor (a name from the ``rrt_dist.features`` registry), its options and how it is run
    (the fields of :class:`rrt_dist.pipelines.extract.ExtractSettings`).

    ``options`` follow the extractor's own config dataclass: each backbone preset extends the schema of
    its extractor (``schema_<extractor>``), so every option can be set as ``backbone.options.KEY=VALUE``
    and a misspelt one fails at start-up naming the key.
    """
    name: str = "tiny-image"
    options: Any = field(default_factory=dict)


def _options_schema(extractor: str) -> type:
    """The extractor's config dataclass as a structured-config schema (tuples become lists of Any)."""
    from rrt_dist.features import extractor_config_class

    cls = extractor_config_class(extractor)
    hints = get_type_hints(cls)

    def omegaconf_type(t):
        return Any if t is tuple or getattr(t, "__origin__", None) is tuple else t

    return make_dataclass(f"{cls.__name__}Options",
                          [(f.name, omegaconf_type(hints[f.name]),
                            field(default_factory=lambda v=f.default: list(v)) if isinstance(f.default, tuple)
                            else field(default=f.default))
                           for f in fields(cls)])


def backbone_schema(extractor: str) -> type:
    """``BackboneConfig`` whose ``options`` are extractor ``extractor``'s."""
    options = _options_schema(extractor)
    return make_dataclass(f"BackboneConfig_{extractor.replace('-', '_')}",
                          [("name", str, field(default=extractor)), ("options", options, field(default_factory=options))],
                          bases=(BackboneConfig,))


@dataclass
class IndexConfig:
    """Global search: a sharded FAISS index (inner product) served by one Ray actor per shard.

    ``mode`` says how evaluation and training rank the gallery: ``exact`` ranks every gallery image in
    process (the protocols' definition), ``sharded`` keeps the top-``k`` of the sharded index. The ``index``
    and ``search`` jobs always build and query the sharded index.
    """
    mode: str = choice("exact", "exact", "sharded")
    # where exact mode scores the gallery's blocks: auto = this driver's GPU when it has a usable one (fp32, no TF32)
    exact_device: str = choice("auto", "auto", "cpu", "cuda")
    factory: str = "Flat"                    # FAISS index_factory string, or "auto" (from the memory budget)
    neighbours: int = bounded(100, ge=1)     # kept per query from the sharded index (sharded mode, search job)
    k: Any = renamed("index.neighbours")
    n_shards: int = bounded(1, ge=1)         # capped at the number of vectors
    params: Optional[str] = None             # search-time parameters, e.g. "nprobe=32" or "efSearch=256"
    memory_budget_gb: float = bounded(8.0, gt=0)     # for factory=auto
    train_size: int = bounded(200_000, ge=1)         # training sample for IVF / PQ
    # rows added since the build go to delta shards (trained quantizer kept) until they pass this fraction of
    # the index; then it is retrained and rebuilt (faiss#2109, #2876)
    rebuild_fraction: float = bounded(0.2, ge=0, le=1)
    with_distractors: bool = True            # index the benchmark's distractors with its gallery
    expand_queries: bool = False             # the search job: alpha-QE (reranker.aqe) before searching
    qe_n: Any = renamed("index.expand_queries=true (the search job's alpha-QE; its n is reranker.aqe.n)")
    qe_alpha: Any = renamed("reranker.aqe.alpha")
    dba_n: int = bounded(0, ge=0)            # database-side augmentation neighbours (0 = off)
    dba_alpha: float = bounded(0.3, ge=0)
    dir: str = "${storage_root}/indexes"


@dataclass
class RerankerRows:
    """Which rows the evaluation reports (the RRT paper's Tables 1-3) and how the top-K is reranked."""
    methods: list[str] = field(default_factory=lambda: ["global"])   # global | aqe | <reranker> | aqe+<reranker>
    depth: int = bounded(100, ge=1)          # the top-K reranked (the paper: 100, 200, 400)
    k: Any = renamed("reranker.depth")
    checkpoint: Optional[str] = None         # RRT weights for rrt rows: a path, or "train" (train_rrt first)
    aqe: AQEConfig = field(default_factory=AQEConfig)   # the aqe rows' (and the search job's) alpha-QE
    aqe_n: Any = renamed("reranker.aqe.n")
    aqe_alpha: Any = renamed("reranker.aqe.alpha")
    num_actors: int = bounded(1, ge=0)       # reranker actors (0: in-process)
    protocol_junk_removal: bool = True       # revisitop: rerank each protocol with its junk removed first
    patch_backbone: Any = None               # backbone whose patch grids structural rows read (None: the run's own)
    qualitative_row: Optional[str] = None    # reranked method the report's figure shows (gv, rrt...; default: the best row)


def _reranker_config() -> type:
    """``RerankerConfig``: :class:`RerankerRows` + ``reranker.<name>`` for each registered reranker that takes
    options, typed by its options dataclass (``rrt_dist.rerank.methods``), so the registry stays the one list."""
    from rrt_dist.rerank.methods import get_reranker, list_rerankers

    def schema(entry) -> type:
        """Its options, plus the keys renamed since (refused naming the new one)."""
        if not any(f.name == "top_locals" for f in fields(entry.options)):
            return entry.options
        return make_dataclass(f"{entry.options.__name__}Schema",
                              [("max_local", Any, renamed(f"reranker.{entry.name}.top_locals"))], bases=(entry.options,))

    schemas = {name: schema(get_reranker(name)) for name in list_rerankers() if get_reranker(name).options}
    return make_dataclass("RerankerConfig", [(name, s, field(default_factory=s)) for name, s in schemas.items()],
                          bases=(RerankerRows,))


RerankerConfig = _reranker_config()


@dataclass
class SelfSupConfig:
    """Self-supervised pairs (``train.pairs=selfsup``, see ``rrt_dist.datasets.selfsup``): ``views`` random warps
    of each source image, extracted like any table; a view is its source's positive, other images from the
    global top-k its negatives. Views are seeded by ``train.seed``."""
    images: Optional[str] = None      # a folder or CSV / Parquet manifest of images; None: the evaluated gallery
    max_images: Optional[int] = bounded(10000, ge=1)   # a seeded sample of that many sources (None: all)
    views: int = bounded(4, ge=1)
    difficulty: float = bounded(0.6, ge=0, le=1)       # 1: crops of 30 % or more, 30 degree rotations
    max_size: int = bounded(640, ge=32)               # views' longest side
    root: str = "${storage_root}/selfsup"   # rendered views: <root>/<images source>/<view settings>/


@dataclass
class GVPairsConfig:
    """Pairs taught by geometric verification on the gallery itself (``train.pairs=gv``, see
    ``rrt_dist.train.gv_pairs``): each gallery image's global top-``neighbours`` and ``random`` random gallery
    images are verified with GV (``reranker.gv``'s options, on the ``reranker.num_actors`` pool); pairs with at least
    ``min_inliers`` inliers are positives, the others negatives. A ``holdout`` share of the images (at most
    ``max_holdout``) is kept out of training: ``min_inliers=null`` is chosen on their pairs, and they validate."""
    neighbours: int = bounded(50, ge=1)
    random: int = bounded(10, ge=0)
    min_inliers: Optional[int] = bounded(None, ge=1)   # null: Otsu's threshold on the held-out images' pairs
    holdout: float = bounded(0.15, gt=0, lt=1)
    max_holdout: int = bounded(2000, ge=1)
    block_rows: int = bounded(2048, ge=1)     # anchors per mining block (one file; a rerun mines only missing blocks)
    root: str = "${storage_root}/mined"       # mined pairs: <root>/<gallery table and mining settings digest>/


def _rrt_overrides() -> type:
    """``train.model``: every :class:`RRTConfig` field, optional (null: the paper's value; global_dim and local_dim
    come from the table), so a misspelt one fails at start-up instead of inside a Ray Train worker."""
    hints = get_type_hints(RRTConfig)
    return make_dataclass("RRTOverrides", [(f.name, Optional[hints[f.name]], field(default=None, metadata=f.metadata))
                                           for f in fields(RRTConfig)])


RRTOverrides = _rrt_overrides()


def rrt_overrides(model) -> dict:
    """The ``train.model`` fields that are set: what the model is built with beyond the paper's defaults."""
    return {k: v for k, v in OmegaConf.to_container(model, resolve=True).items() if v is not None}


@dataclass
class TrainConfig(TrainSettings):
    """RRT training with Ray Train (defaults: the paper's DELG / GLDv2 setting): the loop's own settings
    (:class:`rrt_dist.train.core.TrainSettings`) plus how the driver samples pairs, validates and places workers.

    A run is named ``name`` (default: derived from the dataset, backbone and these settings) under
    ``storage_path``; rerunning a name resumes from its latest checkpoint, and a finished run is reused.
    """
    # where training pairs come from: labels (the dataset's labelled training split), selfsup (warps of the
    # gallery's own images, no labels), mixed (both), gv (the gallery's own pairs that geometric verification
    # accepts or rejects, no labels); auto: the dataset's default (a folder gallery's recipe), else labels
    pairs: str = choice("auto", "auto", "labels", "selfsup", "mixed", "gv")
    model: RRTOverrides = field(default_factory=RRTOverrides)     # RRTConfig fields that differ from the paper's
    selfsup: SelfSupConfig = field(default_factory=SelfSupConfig)
    gv: GVPairsConfig = field(default_factory=GVPairsConfig)
    neighbours: int = bounded(100, ge=1)     # global neighbours per training image (pairs are mined there)
    k: Any = renamed("train.neighbours")
    min_positives: int = bounded(5, ge=1)    # same-label images an anchor needs among them
    joint_stages: list[str] = field(default_factory=list, metadata={"choices": ("frozen", "finetune")})
    crop_scale: list[float] = bounded(gt=0, le=1, factory=lambda: [0.25, 1.0])  # images: random crop's share of the area
    data_cpus: float = bounded(0.5, gt=0)    # images: CPUs per Ray Data decode task (beside the workers' CPUs)
    metric: MetricSettings = field(default_factory=MetricSettings)   # train_metric: loss and what it sees
    val_depth: int = bounded(100, ge=1)      # the top-K reranked when validating each epoch
    val_k: Any = renamed("train.val_depth")
    max_local: Any = renamed("train.top_locals")
    val_holdout_labels: int = bounded(50, ge=1)   # datasets without a validation split: labels held out of training
    num_workers: int = bounded(2, ge=1)      # resources of each: ray.train
    name: Optional[str] = None
    storage_path: str = "${storage_root}/train"   # local folder or URI (s3://, gs://) shared by the workers
    keep_checkpoints: int = bounded(2, ge=1)  # best by validation score; the latest is always kept too
    max_failures: int = bounded(3, ge=0)     # worker failures survived (restart from the latest checkpoint)
    fail_at_epoch: Optional[int] = bounded(None, ge=0)   # fault injection (tests): one worker dies once at this epoch
    fail_at_step: int = bounded(0, ge=0)     # ... before this step of it (0: as the epoch starts; > 0: mid-epoch)


@dataclass
class GalleryConfig:
    """A named gallery that grows (``rrt-dist ingest``): its feature table, image catalog, versioned sharded index
    and ingest history live under ``<root>/<name>/``. New images come from ``images`` (a folder, searched
    recursively) or ``manifest`` (CSV or Parquet with a ``uri`` or ``path`` column, optional ``id`` and
    ``label``; paths relative to the manifest's folder); neither, for a gallery that exists, brings it to a
    consistent state (lost rows extracted again, an earlier release's gallery upgraded) and commits."""
    name: str = "default"
    root: str = "${storage_root}/galleries"
    images: Optional[str] = None
    manifest: Optional[str] = None
    replace: bool = False          # a batch row whose id the gallery lists with another path replaces it (else refused)


@dataclass
class SearchConfig:
    """The search job on a gallery (``gallery.name``): ``queries`` is a folder, CSV or Parquet of query images
    (local or fsspec, as ingest takes); ``rerank`` a registry reranker for the top ``reranker.depth`` (null: the
    global order only). Without ``queries`` the job searches the benchmark's own queries. Queries are searched
    and reranked ``chunk`` at a time, each chunk's results committed as it ends (a rerun redoes only unfinished
    chunks); ``results.html`` shows the first ``page_queries`` queries, with thumbnails of ``thumbnail_px``."""
    queries: Optional[str] = None
    rerank: Optional[str] = None
    chunk: int = bounded(1000, ge=1)
    page_queries: int = bounded(100, ge=0)
    thumbnail_px: int = bounded(160, ge=16)


@dataclass
class ServePart:
    """One deployment of the search service: what each replica asks for (the rule of ``ray.<stage>``), how many
    requests it takes at once, and how Serve scales it (``autoscaling_config``: from ``min_replicas`` to
    ``max_replicas`` by ongoing requests). ``num_cpus: null``: the part's default (extractor and reranker 1,
    searcher and gateway 0.5), scaled down to fit the machine when the service starts its own Ray.
    ``max_ongoing_requests: null``: two batches (``serve.batch_size``) for the extractor and the reranker, four for
    the searcher, 256 for the gateway."""
    num_cpus: Optional[float] = bounded(None, ge=0)
    num_gpus: float = bounded(0.0, ge=0)
    min_replicas: int = bounded(1, ge=0)
    max_replicas: int = bounded(1, ge=1)
    target_ongoing_requests: float = bounded(2.0, gt=0)
    max_ongoing_requests: Optional[int] = bounded(None, ge=1)


@dataclass
class ServeConfig:
    """``rrt-dist serve``: galleries searched over HTTP (``POST /search``) and a search page (``/``).

    Binds ``host``:``port``; any host but loopback needs a bearer token, read from the environment variable
    named by ``token_env`` (never from a file). ``galleries``: the names served (default: ``gallery.name``),
    all ingested with this run's backbone. A snapshot committed by an ingest is served within ``refresh_s``
    seconds, without a restart."""
    galleries: Optional[list[str]] = None
    host: str = "127.0.0.1"
    port: int = bounded(8000, ge=1, le=65535)
    token_env: str = "RRT_SERVE_TOKEN"
    max_bytes: int = bounded(20 * 2**20, ge=1)          # larger uploads are refused (413), while they arrive
    read_timeout_s: float = bounded(10.0, gt=0)         # a client that stops sending its upload is answered 408
    max_image_bytes: int = bounded(50 * 2**20, ge=1)    # GET /images: larger gallery files are refused (413)
    fetch_http_images: bool = False                     # GET /images of http(s) URIs: fetched server-side only if true
    max_k: int = bounded(1000, ge=1)
    refresh_s: float = bounded(2.0, gt=0)
    start_timeout_s: float = bounded(600.0, gt=0)       # deployments not running by then: one line says which
    batch_size: int = bounded(8, ge=1)                  # queries per batched extractor / searcher / reranker call
    batch_wait_s: float = bounded(0.01, ge=0)
    extractor: ServePart = field(default_factory=ServePart)
    searcher: ServePart = field(default_factory=ServePart)
    reranker: ServePart = field(default_factory=ServePart)
    gateway: ServePart = field(default_factory=ServePart)


@dataclass
class BrowseConfig:
    """The results browser every evaluation writes (``<output_dir>/browse/index.html``; ``rrt-dist browse RUN``)."""
    enabled: bool = True
    top: int = bounded(10, ge=1)                 # images per row of a query page
    thumbnail_px: int = bounded(160, ge=16)      # thumbnails' longest side (the originals are never copied)
    max_queries: int = bounded(500, ge=1)        # larger runs keep the queries reranking moved most


@dataclass
class Config:
    dataset: Any = MISSING
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    browse: BrowseConfig = field(default_factory=BrowseConfig)
    # What jobs write and later jobs reuse (feature tables, indexes, galleries, training runs, rendered views) lives
    # under one root: a local or shared path, or an fsspec URI (s3://, gs://). On a cluster it must outlive the
    # cluster, not be Ray's temporary copy of the working directory.
    storage_root: str = "data"
    features_dir: str = "${storage_root}/features"   # Lance feature tables: <features_dir>/<benchmark>/<fingerprint>/
    output_dir: str = "${hydra:runtime.output_dir}"  # this run's report, figures, exported weights (a local folder)
    # where the output folder is copied when the job ends (ended by an error too): <outputs_root>/<job>/<run>;
    # null: <storage_root>/outputs for a job started by `ray job submit`, no copy for a local run
    outputs_root: Optional[str] = None


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity / container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, schema in DATASET_SCHEMAS.items():   # configs/dataset/<name>.yaml: defaults: [schema_<kind>]
        cs.store(group="dataset", name=f"schema_{name}", node=schema)
    from rrt_dist.features import list_extractors

    for extractor in list_extractors():
        cs.store(group="backbone", name=f"schema_{extractor.replace('-', '_')}", node=backbone_schema(extractor))
    for group, schema in (("backbone", BackboneConfig), ("index", IndexConfig), ("reranker", RerankerConfig),
                          ("train", TrainConfig), ("ray", RayConfig)):
        cs.store(group=group, name="schema", node=schema)
    cs.store(group="dataset/distractors", name="schema", node=DistractorsConfig)
    # ${rrt.cpus:}: the CPUs this process may use (configs/ray/local.yaml)
    OmegaConf.register_new_resolver("rrt.cpus", available_cpus, replace=True)


register()
