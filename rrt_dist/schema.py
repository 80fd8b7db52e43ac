"""The bottom layer: errors, ids and the settings dataclasses that double as config schemas.

Nothing here imports torch, Ray, Lance or FAISS, so ``rrt_dist.config`` assembles and checks a whole
configuration in about a second. A pure core's settings dataclass (``ExtractSettings``, ``TrainSettings``,
``MetricSettings``, ``StageResources``) is the one definition of its options; ``rrt_dist.config`` extends it into
the Hydra schema. Bounds and choices ride on the fields as metadata, so
:func:`rrt_dist.config.validate_config` checks them without a second list.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Optional

NO_ID = -1   # "no result": pads rankings (as FAISS does); never an image id
DEFAULT_MAX_PIXELS = 100_000_000     # larger images are refused as decompression bombs
LOCAL_ENCODINGS = ("fp16", "int8", "pq")   # how local descriptors are stored (rrt_dist.store.features)
LOSSES = ("margin", "triplet", "multisimilarity")   # metric-learning losses (rrt_dist.train.metric)


# ------------------------------------------------------------------------------------------------
# Errors a user causes: a job reports each in one line naming the file or key, and exits 2.
# ------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


class DatasetLayoutError(FileNotFoundError, ValueError):
    """A benchmark file is missing or malformed; the message names it and the expected layout."""

    def __init__(self, path: Path | str, problem: str, expected: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}. Expected layout: {expected}")


class SyntheticRootMismatch(RuntimeError):
    """A synthetic benchmark folder rendered from other generator settings."""


class WeightsUnavailable(RuntimeError):
    """Model weights that are neither on the hub (reachable) nor at a local path."""


class FeatureTableMismatch(ValueError):
    """A feature table written by another extractor (or with other dimensions)."""


class IndexMismatch(ValueError):
    """A query or an update that does not fit the index (dimension, extractor, transformed vectors)."""


class UnreadableTable(RuntimeError):
    """A feature table whose newest version cannot be read (a corrupt or missing manifest, a store error): it is
    never taken for "no table" and never removed; the message names the table and its last readable version."""


class DamagedTable(UnreadableTable):
    """A table whose current version names data files that are missing or not of the size its manifest records (a
    lost or truncated file): never read as if whole; the message names the table, the files and the command that
    repairs it (``rrt-dist restore-table``)."""


class RayStartError(RuntimeError):
    """The embedded Ray did not come up (a loaded machine, a port or a temp folder it could not use)."""


class StorageFull(OSError):
    """No space left where a table is written: named with the table; what was committed is kept."""


class GpuUnavailable(RuntimeError):
    """A stage's process that Ray gave a GPU (``ray.<stage>.num_gpus``) and that cannot use it: named with the
    stage and what torch or FAISS reported, instead of computing on the CPU while holding the GPU."""


class GalleryNotReady(RuntimeError):
    """A gallery with no snapshot a reader can answer from (never ingested, a first ingest that did not finish, an
    index version that is gone): named with what to run. The service answers 503 for it and serves the others."""

    def __init__(self, gallery: str, reason: str):
        super().__init__(gallery, reason)              # both in args: it crosses processes (pickled) whole
        self.gallery, self.reason = gallery, reason

    def __str__(self) -> str:
        return f"gallery {self.gallery!r} is not ready: {self.reason}"


USER_ERRORS = (RayStartError, GalleryNotReady, ConfigError, DatasetLayoutError, SyntheticRootMismatch, WeightsUnavailable, FeatureTableMismatch,
               IndexMismatch, UnreadableTable, DamagedTable, StorageFull, GpuUnavailable)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (a Ray task error, a LanceError, an OSError, or anything that wraps one) is a full device."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


# ------------------------------------------------------------------------------------------------
# Field helpers
# ------------------------------------------------------------------------------------------------

def bounded(default=MISSING, *, ge=None, gt=None, le=None, lt=None, factory=None):
    """A field whose value (each element, for lists) must lie within the given bounds (None always passes)."""
    limits = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata={"bounds": limits})
    return field(default=default, metadata={"bounds": limits})


def choice(default, *options):
    return field(default=default, metadata={"choices": options})


def renamed(to: str):
    """A key that is gone: setting it (override or YAML) is refused at start-up with a message naming ``to``."""
    return field(default=None, metadata={"renamed": to})


# ------------------------------------------------------------------------------------------------
# Settings of the stages
# ------------------------------------------------------------------------------------------------

@dataclass
class StageResources:
    """What each Ray actor (or Ray Train worker) of one stage asks for (``ray.<stage>``): Ray places it by
    these, and the autoscaler adds the nodes they need. Intra-op threads inside follow ``num_cpus``.

    ``num_gpus: null`` asks for one GPU per actor when the Ray the job runs on has one for each actor of the
    stage (an embedded Ray on a GPU machine) and none otherwise; a cluster that starts with no GPU node
    reports none, so presets for autoscaled clusters (``ray=cluster``) set it.
    """
    num_cpus: float = bounded(1.0, ge=0)            # 0: reserves none (runs beside the others), 1 thread
    num_gpus: Optional[float] = bounded(None, ge=0)
    resources: dict[str, float] = field(default_factory=dict)   # custom resources, e.g. {"large_memory": 1}
    intra_op_threads: Optional[int] = bounded(None, ge=1)   # default: num_cpus (at least 1)

    def gpus(self, actors: int = 1) -> float:
        if self.num_gpus is not None:
            return float(self.num_gpus)
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) >= actors else 0.0

    def actor_options(self, actors: int = 1) -> dict:
        """``ray.remote(...).options(**)`` / ``map_batches(**)`` keywords for one of ``actors`` actors."""
        options = {"num_cpus": self.num_cpus, "num_gpus": self.gpus(actors)}
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    @property
    def threads(self) -> int:
        return self.intra_op_threads or max(1, int(self.num_cpus))


@dataclass
class PoolResources(StageResources):
    """An autoscaling actor pool (Ray Data's ``ActorPoolStrategy(min_size, max_size)``): it starts with
    ``min_actors`` and grows to ``max_actors`` as the autoscaler adds nodes (null: a fixed pool)."""
    min_actors: int = bounded(1, ge=1)
    max_actors: Optional[int] = bounded(None, ge=1)

    def strategy(self):
        import ray.data

        return ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=max(self.min_actors,
                                                                                 self.max_actors or 0))


@dataclass
class SearchResources(StageResources):
    """The search shard actors (``ray.search``). ``num_gpus: null`` with ``gpu_min_vectors`` set serves each shard
    of at least that many vectors from a GPU (one per such actor) and smaller ones from CPUs: a flat 1M x 2048
    shard answered 70 queries 139x faster from an H200 than from 16 CPU cores (docs/benchmarks.md), for a
    one-off load of its vectors; a small shard is not worth a GPU node."""
    gpu_min_vectors: Optional[int] = bounded(None, ge=1)

    def shard_gpus(self, n_vectors: int, actors: int = 1) -> float:
        if self.num_gpus is None and self.gpu_min_vectors is not None:
            return 1.0 if n_vectors >= self.gpu_min_vectors else 0.0
        return self.gpus(actors)


@dataclass
class ExtractSettings:
    """How the extraction pipeline runs: the fields of the ``backbone`` config group that are not the
    extractor's own (``rrt_dist.config.BackboneConfig`` extends this class)."""
    batch_size: int = bounded(16, ge=1)              # images per actor call (and per written fragment)
    commit_every: int = bounded(256, ge=1)           # images per Lance commit
    retry_errors: bool = False                       # extract images recorded as unreadable again
    max_image_pixels: int = bounded(DEFAULT_MAX_PIXELS, ge=1)   # larger images are recorded as errors (decompression bombs)
    local_storage: str = choice("fp16", *LOCAL_ENCODINGS)   # locals on disk: fp16 | int8 (+ a scale each) | pq
    local_pq_m: int = bounded(16, ge=1)              # pq: codes (bytes) per local descriptor
    local_pq_sample: int = bounded(200, ge=1)        # pq: images whose locals train the codebook (seeded sample)
    keep_versions: int = bounded(3, ge=1)            # table versions kept when a run ends (older ones and their files go)
    uncommitted_grace_s: float = bounded(3600.0, ge=0)   # uncommitted files younger than this are kept (another writer's)
    stop_after_commits: Optional[int] = bounded(None, ge=0)  # fault injection (tests): stop at the next commit after N
    stop_by_kill: bool = False                       # ... by SIGKILL of this process instead of raising InjectedFailure


@dataclass(frozen=True)
class RRTConfig:
    """The Reranking Transformer's architecture (``rrt_dist.models.rrt``); the paper's model by default."""
    global_dim: int = 2048
    local_dim: int = 128
    model_dim: int = 128
    num_heads: int = 4
    num_layers: int = 6
    mlp_dim: int = 1024
    num_scales: int = 7
    dropout: float = 0.0
    use_global: bool = True
    position_encoding: str = choice("scale", "scale", "sine2d")


@dataclass
class AQEConfig:
    """alpha-QE (``reranker.aqe``): each query is expanded with its top-``n`` neighbours weighted by similarity to
    the power ``alpha`` (Radenović et al.), as the RRT paper tunes it. Used by the ``aqe`` rows of an evaluation
    and by the search job's ``reranker.methods=[aqe]``."""
    n: int = bounded(2, ge=1)
    alpha: float = bounded(0.3, ge=0)


@dataclass
class TrainSettings:
    """What the RRT training loop itself reads (``rrt_dist.config.TrainConfig`` extends this class with how the
    driver prepares data, validates and places workers)."""
    epochs: int = bounded(15, ge=1)
    lr: float = bounded(1e-4, gt=0)
    weight_decay: float = bounded(5e-4, ge=0)        # 4e-4 in the SOP setting
    batch_size: int = bounded(12, ge=1)      # triplets per step per worker (the global batch scales with workers)
    grad_clip: Optional[float] = bounded(0.1, gt=0)
    milestones: list[int] = bounded(ge=1, factory=list)   # MultiStepLR: epochs where lr *= gamma
    gamma: float = bounded(0.1, gt=0)
    warmup_steps: int = bounded(0, ge=0)    # lr rises linearly from lr / warmup_steps over the first steps (0: none)
    seed: int = 0
    top_locals: Optional[int] = bounded(None, ge=1)  # an image's best locals fed to RRT in training (None: all stored)
    positive_scope: str = choice("topk", "topk", "label")   # topk (GLDv2: from the top-k) | label (SOP: any same label)
    # RRTConfig fields that differ from the paper's model (global_dim and local_dim come from the table); the
    # config types them (train.model.<field>, a typo fails at start-up)
    model: dict[str, Any] = field(default_factory=dict)
    embedding_init_std: float = bounded(0.02, gt=0)  # initial segment / scale embeddings (N(0,1) stalls training)
    match_init: float = bounded(0.0, ge=0)   # query / key projections start as match_init x identity (0: random)
    # The exported model orders candidates by logit + w × global cosine, w the fusion weight its validation chose
    # (recorded in the checkpoint as global_weight); False: w = 0, the paper's RRT (validation still reports w).
    global_fusion: bool = False


@dataclass
class MetricSettings:
    """``train.metric``: the loss and what it sees (defaults: DIML / the ViT-reranking reference code)."""
    loss: str = choice("margin", *LOSSES)
    structural: bool = True                 # G+S in the loss (Table 2's ✓ training); False: global only
    per_class: int = bounded(2, ge=2)       # images per class in a batch (train.batch_size is the whole batch)
    freeze_batchnorm: bool = True           # DIML's ResNet-50 (BatchNorm in eval mode, statistics kept)
    beta_lr: float = bounded(5e-4, gt=0)    # margin: learning rate of the per-class beta
    margin: float = bounded(0.2, ge=0)      # margin and triplet losses
    beta: float = bounded(1.2, gt=0)        # margin: initial beta (the reference code's; not 0.6)
    cutoff: float = bounded(0.5, ge=0)      # distance-weighted miner
    nonzero_loss_cutoff: float = bounded(1.4, gt=0)
    ms_alpha: float = bounded(2.0, gt=0)    # multi-similarity loss
    ms_beta: float = bounded(40.0, gt=0)
    ms_base: float = 0.5
    ms_epsilon: float = bounded(0.1, ge=0)  # multi-similarity miner
    val_batch: int = bounded(32, ge=1)      # images per forward pass when validating


def first_line(err: BaseException) -> str:
    """An error's first line for a one-line message (its type's name when it says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
