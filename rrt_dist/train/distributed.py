"""RRT training on N Ray Train workers (DDP: gloo on CPU, NCCL on GPU), checkpointed every epoch.

The driver puts the training rows (ids, labels, global neighbours, anchors) and the validation set in
the object store; each worker trains on its own disjoint anchor shard of each epoch, and rank 0
validates, writes TensorBoard scalars and the checkpoint. One loop, two tasks:

* ``features``: RRT on the descriptors of a Lance table, each worker reading its batches itself;
* ``joint``: a dense-grid backbone + RRT from images (one stage, ``frozen`` or ``finetune``, per run),
  each worker streaming its triplets' images through Ray Data tasks that decode and augment them.

    <storage_path>/<name>/epoch_NNN/model.pt     the RRT, loadable by rrt_dist.models.load_released_checkpoint
    <storage_path>/<name>/epoch_NNN/joint.pt     (joint) the whole backbone + projection + RRT state
    <storage_path>/<name>/epoch_NNN/trainer.pt   optimizer, lr schedulers, history (for resuming)
    <storage_path>/<name>/tensorboard/

Rerunning the same name resumes from the latest checkpoint (a finished run is simply returned).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch

from rrt_dist.devices import require_gpu
from rrt_dist.schema import StageResources, TrainSettings
from rrt_dist.store import FeatureStore

from .core import (TripletBatches, build_model, epoch_triplets, load_trainer_state, lr_schedulers, model_checkpoint,
                   train_step, validate)

log = logging.getLogger(__name__)


class FeatureTask:
    """RRT on descriptors stored in a Lance table (the DELG / GLDv2 setting): each worker reads its batches itself."""

    def __init__(self, config: dict, settings: TrainSettings, rank: int, world_size: int):
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.rows = ray.get(config["rows"])
        self.store = FeatureStore(*config["table"])
        self.batches = TripletBatches(self.store, self.rows["ids"], settings.top_locals)
        self.val = ray.get(config["val"]) if rank == 0 and config["val"] is not None else None
        self.val_k = config["val_k"]

    def build(self) -> torch.nn.Module:
        return build_model(self.settings, self.store.global_dim, self.store.local_dim)

    def prepare_kwargs(self) -> dict:
        return {}

    def optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.settings.lr,
                                 weight_decay=self.settings.weight_decay)

    def throughput(self, steps: int, seconds: float) -> dict:
        return {"pairs_per_s": 2 * steps * self.settings.batch_size * self.world_size / max(seconds, 1e-9)}

    def set_mode(self, model) -> None:
        model.train()

    def triplets(self, epoch: int) -> np.ndarray:
        return epoch_triplets(self.rows["anchors"], self.rows["neighbours"], self.rows["labels"], self.settings,
                              epoch, self.rank, self.world_size)

    def epoch_batches(self, epoch: int):
        triplets = self.triplets(epoch)
        return len(triplets) // self.settings.batch_size, self.batches.epoch(triplets, self.settings.batch_size)

    def step(self, model, optimizer, batch: dict) -> dict:
        return train_step(model, optimizer, batch, self.settings.grad_clip)

    def validate(self, model) -> dict | None:
        return None if self.val is None else validate(model, self.val, self.val_k, self.settings.top_locals)

    def save(self, model, epoch: int, metrics: dict, folder: Path) -> None:
        torch.save(model_checkpoint(model, self.settings, epoch, metrics), folder / "model.pt")

    def load(self, model, folder: Path) -> None:
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True)["state"])


class GVPairTask(FeatureTask):
    """RRT on descriptors, its triplets drawn from pairs geometric verification accepted or rejected on the gallery
    itself (``train.pairs=gv``, ``rrt_dist.train.gv_pairs``) instead of labels."""

    def triplets(self, epoch: int) -> np.ndarray:
        from .gv_pairs import epoch_pair_triplets

        return epoch_pair_triplets(self.rows, self.settings.seed, epoch, self.rank, self.world_size)


class JointTask(FeatureTask):
    """A dense-grid backbone + RRT trained from images (the SOP setting, one stage per run): each worker
    streams its epoch's triplets through Ray Data (decode + augment in CPU tasks beside the workers)."""

    def __init__(self, config: dict, settings: TrainSettings, rank: int, world_size: int):
        from rrt_dist.features import create_preparer
        from rrt_dist.features.grid import DenseGrid

        from .joint import ReextractedValidation

        super().__init__(config, settings, rank, world_size)
        self.stage, self.init, self.uris = config["stage"], config["init"], self.rows["uris"]
        self.backbone = config["backbone"]
        self.extractor_cfg = DenseGrid.parse_config(**{**self.backbone["options"], "device": "cpu"})
        self.crop_scale, self.data_cpus = tuple(config["crop_scale"]), config["data_cpus"]
        if self.val is not None:
            self.val = ReextractedValidation(self.val, create_preparer(self.backbone["name"], **self.backbone["options"]))

    def build(self) -> torch.nn.Module:
        from rrt_dist.features.grid import DenseGrid

        from .joint import JointReranker

        torch.manual_seed(self.settings.seed)
        model = JointReranker(DenseGrid(**{**self.backbone["options"], "device": "cpu"}), **self.settings.model)
        if self.init:                              # the finetune stage starts from the frozen stage's best weights
            model.load_state_dict(torch.load(self.init, map_location="cpu", weights_only=True))
        return model

    def prepare_kwargs(self) -> dict:
        # The backbone's classifier head is never on the path to the reranker's logits.
        return {"parallel_strategy_kwargs": {"find_unused_parameters": True}} if self.stage == "finetune" else {}

    def set_mode(self, model) -> None:
        from .joint import set_stage

        set_stage(model, self.stage)

    def epoch_batches(self, epoch: int):
        from .joint import decode_triplets, triplet_rows

        bs = self.settings.batch_size
        triplets = self.triplets(epoch)
        triplets = triplets[:len(triplets) // bs * bs]        # equal steps on every worker
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True        # the seeded order, so resumed epochs repeat exactly
        context.enable_progress_bars = False
        images = ray.data.from_items(triplet_rows(self.uris, triplets, self.settings.seed, epoch, self.rank)).map_batches(
            decode_triplets, fn_kwargs={"image_size": self.extractor_cfg.image_size, "scale": self.crop_scale},
            batch_size=bs, batch_format="numpy", num_cpus=self.data_cpus)
        return len(triplets) // bs, self._batches(images.iter_batches(batch_size=bs, batch_format="numpy",
                                                                      prefetch_batches=2, drop_last=True))

    def _batches(self, decoded):
        from .joint import triplet_batch

        t = time.perf_counter()
        for images in decoded:
            waited = time.perf_counter() - t
            yield triplet_batch(images, self.extractor_cfg.mean, self.extractor_cfg.std), waited
            t = time.perf_counter()

    def step(self, model, optimizer, batch: dict) -> dict:
        from .joint import joint_loss

        return train_step(model, optimizer, batch, self.settings.grad_clip, joint_loss)

    def validate(self, model) -> dict | None:
        return None if self.val is None else self.val(model, self.val_k)

    def save(self, model, epoch: int, metrics: dict, folder: Path) -> None:
        torch.save(model_checkpoint(model.rrt, self.settings, epoch, {**metrics, "stage": self.stage}),
                   folder / "model.pt")                # the reranker alone, in the released layout
        torch.save(model.state_dict(), folder / "joint.pt")

    def load(self, model, folder: Path) -> None:
        model.load_state_dict(torch.load(folder / "joint.pt", map_location="cpu", weights_only=True))


class MetricTask:
    """An extractor trained with a metric-learning loss on global (+ structural) similarity, from images
    (``rrt_dist.train.metric``): class-balanced batches split across the workers in whole classes, each
    worker streaming its share through Ray Data (decode + seeded augmentation in CPU tasks)."""

    def __init__(self, config: dict, settings: TrainSettings, rank: int, world_size: int):
        from rrt_dist.features import extractor_config_class
        from rrt_dist.schema import MetricSettings

        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.metric = MetricSettings(**config["metric"])
        self.rows = ray.get(config["rows"])                       # uris, labels (0..n_classes-1)
        self.extractor = config["backbone"]["name"]
        self.options = {**config["backbone"]["options"], "device": "cpu"}
        self.extractor_cfg = extractor_config_class(self.extractor)(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in self.options.items()})
        self.structural, self.val_k = config["structural"], config["val_k"]
        self.crop_scale, self.data_cpus = tuple(config["crop_scale"]), config["data_cpus"]
        self.val = ray.get(config["val"]) if rank == 0 and config["val"] is not None else None
        self.objective = None

    def build(self) -> torch.nn.Module:
        from rrt_dist.features import create_extractor

        from .metric import MetricEmbedder, Objective

        torch.manual_seed(self.settings.seed)
        model = MetricEmbedder(create_extractor(self.extractor, **self.options))
        n_classes = int(self.rows["labels"].max()) + 1
        self.objective = Objective(self.metric, n_classes, model.project.out_features, self.structural)
        return model

    def prepare_kwargs(self) -> dict:
        # The backbone's classifier head is never on the path to the embedding.
        return {"parallel_strategy_kwargs": {"find_unused_parameters": True}}

    def optimizer(self, model) -> torch.optim.Optimizer:
        from .metric import optimizer_for

        return optimizer_for(model, self.objective, self.settings.lr, self.settings.weight_decay, self.metric.beta_lr)

    def throughput(self, steps: int, seconds: float) -> dict:
        return {"images_per_s": steps * self.settings.batch_size / max(seconds, 1e-9)}

    def set_mode(self, model) -> None:
        from .metric import set_train_mode

        set_train_mode(model, self.metric.freeze_batchnorm)

    def epoch_batches(self, epoch: int):
        from .metric import class_balanced_batches, decode_images, worker_share

        s = self.settings
        batches = worker_share(class_balanced_batches(self.rows["labels"], self.metric.per_class, s.batch_size,
                                                      s.seed, epoch), self.rank, self.world_size, self.metric.per_class)
        n, size = batches.shape
        crop_seeds = np.random.default_rng([s.seed, epoch, self.rank, 4]).integers(0, 2 ** 62, size=batches.size)
        rows = [{"uri": self.rows["uris"][r], "label": int(self.rows["labels"][r]), "seed": int(c),
                 "step_seed": s.seed * 1_000_003 + epoch * 10_007 + step}     # the same on every worker
                for (step, r), c in zip(((i // size, r) for i, r in enumerate(batches.ravel().tolist())), crop_seeds)]
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True        # the seeded order, so resumed epochs repeat exactly
        context.enable_progress_bars = False
        images = ray.data.from_items(rows).map_batches(
            decode_images, fn_kwargs={"image_size": self.extractor_cfg.image_size, "scale": self.crop_scale},
            batch_size=size, batch_format="numpy", num_cpus=self.data_cpus)
        return n, self._batches(images.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=2,
                                                    drop_last=True))

    def _batches(self, decoded):
        from .metric import image_batch

        t = time.perf_counter()
        for batch in decoded:
            waited = time.perf_counter() - t
            yield image_batch(batch, self.extractor_cfg.mean, self.extractor_cfg.std), waited
            t = time.perf_counter()

    def step(self, model, optimizer, batch: dict) -> dict:
        from .metric import metric_step

        self.objective.to(batch["images"].device)
        return metric_step(model, self.objective, optimizer, batch["images"], batch["labels"], int(batch["seed"]),
                           self.world_size, self.settings.grad_clip)

    def validate(self, model) -> dict | None:
        from .metric import embed_features, retrieval_metrics

        if self.val is None:
            return None
        was_training = {m: m.training for m in model.modules()}
        model.eval()
        features = embed_features(model, self.val["images"], self.metric.val_batch)
        metrics = retrieval_metrics(self.val["bench"], features, self.structural, self.val_k)
        for module, mode in was_training.items():
            module.training = mode
        return {"metrics": metrics, "score": metrics["structural" if self.metric.structural else "global"]["MAP@R"]}

    def save(self, model, epoch: int, metrics: dict, folder: Path) -> None:
        torch.save({"model": model.state_dict(), "objective": self.objective.state_dict(), "epoch": epoch,
                    "metrics": metrics}, folder / "metric.pt")

    def load(self, model, folder: Path) -> None:
        state = torch.load(folder / "metric.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])


TASKS = {"features": FeatureTask, "gv_pairs": GVPairTask, "joint": JointTask, "metric": MetricTask}


def _restore(task, model, optimizer, schedulers: dict) -> tuple[int, list]:
    """Load the latest checkpoint if this run has one: (first epoch to train, history so far)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        state = load_trainer_state(folder)
        task.load(getattr(model, "module", model), Path(folder))
    optimizer.load_state_dict(state["optimizer"])
    saved = state.get("schedulers") or {"epoch": state["scheduler"]}     # checkpoints before warmup: one scheduler
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(saved[name])
    return state["epoch"] + 1, state["history"]


def _maybe_fail(config: dict, epoch: int, rank: int, world_size: int, step: int = 0) -> None:
    """Fault injection: the last worker dies (once per run) before step ``fail_at_step`` of epoch ``fail_at_epoch``
    (0: as it starts), after the previous epoch's checkpoint is committed (a crash before that would, rightly,
    resume from the one before)."""
    if config.get("fail_at_epoch") != epoch or config.get("fail_at_step", 0) != step or rank != world_size - 1:
        return
    marker = Path(config["fail_marker"])
    if not marker.exists():
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)


def _quiet_reports() -> None:
    """Ray Train 2.60 logs every ``report`` at INFO on a logger named after its file (outside ``ray.train``, so
    LoggingConfig misses it): one long line per worker and epoch. The epoch lines already say it."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:      # another Ray layout: keep its logs
        return
    logging.getLogger(train_context.__name__).setLevel(logging.WARNING)     # that module's logger, never the root


def train_worker(config: dict) -> None:
    """Ray Train worker loop."""
    import ray.train.torch
    from torch.utils.tensorboard import SummaryWriter

    _quiet_reports()
    require_gpu("train")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    settings = TrainSettings(**config["settings"])
    task = TASKS[config["task"]](config, settings, rank, world_size)
    core_model = task.build()
    task.set_mode(core_model)
    model = ray.train.torch.prepare_model(core_model, **task.prepare_kwargs())
    optimizer = task.optimizer(model)
    schedulers = lr_schedulers(optimizer, settings)
    start, history = _restore(task, model, optimizer, schedulers)
    if start and rank == 0:
        log.info(f"resuming at epoch {start + 1}/{settings.epochs} from the latest checkpoint" if start < settings.epochs
              else f"all {settings.epochs} epochs were trained: nothing to do")
    device = ray.train.torch.get_device()
    writer = SummaryWriter(config["tensorboard_dir"]) if rank == 0 else None

    for epoch in range(start, settings.epochs):
        _maybe_fail(config, epoch, rank, world_size)
        losses, accuracies, data_s, step_s = [], [], 0.0, 0.0
        t_epoch = time.perf_counter()
        n_steps, batches = task.epoch_batches(epoch)
        for step, (batch, waited) in enumerate(batches):
            if step:
                _maybe_fail(config, epoch, rank, world_size, step)      # mid-epoch (step 0: above)
            t = time.perf_counter()
            out = task.step(model, optimizer, {k: v.to(device) for k, v in batch.items()})
            if "step" in schedulers:
                schedulers["step"].step()
            step_s += time.perf_counter() - t
            data_s += waited
            losses.append(out["loss"])
            accuracies.append(out["accuracy"])
            if rank == 0 and n_steps >= 50 and (step + 1) % (n_steps // 10) == 0:   # long epochs: progress
                elapsed = time.perf_counter() - t_epoch
                log.info(f"  epoch {epoch + 1} step {step + 1}/{n_steps}: loss {np.mean(losses[-50:]):.4f}, "
                      f"ETA {elapsed * (n_steps - step - 1) / (step + 1):.0f} s")
        schedulers["epoch"].step()
        train_s = time.perf_counter() - t_epoch
        steps = len(losses)
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "accuracy": float(np.mean(accuracies)) if accuracies else float("nan"),
                   "steps": steps, **task.throughput(steps, train_s),
                   "data_s_per_step": data_s / max(steps, 1), "compute_s_per_step": step_s / max(steps, 1),
                   "lr": optimizer.param_groups[0]["lr"], "resumed_after": start}   # epochs done when this attempt began
        if rank != 0:
            ray.train.report(metrics)
            continue
        t = time.perf_counter()
        result = task.validate(core_model)
        if result is not None:
            metrics.update(val_score=result["score"], val_metrics=result["metrics"], val_s=time.perf_counter() - t)
            if "fusion" in result:
                metrics["val_fusion"] = result["fusion"]
        history.append(metrics)
        for key in ("loss", "accuracy", "pairs_per_s", "images_per_s", "val_score"):
            if key in metrics:
                writer.add_scalar(key, metrics[key], epoch + 1)
        writer.flush()
        epoch_s = time.perf_counter() - t_epoch
        rate = ", ".join(f"{v:.1f} {k.replace('_per_s', '')}/s" for k, v in metrics.items() if k.endswith("_per_s"))
        log.info(f"epoch {epoch + 1}/{settings.epochs}: loss {metrics['loss']:.4f}, "
              f"accuracy {metrics['accuracy']:.3f}, {rate}" +
              (f", validation {100 * metrics['val_score']:.2f}" if "val_score" in metrics else "") +
              (f" (+ {metrics['val_fusion']['global_weight']:g} × global: {100 * metrics['val_fusion']['score']:.2f}; "
               f"global only: {100 * metrics['val_fusion']['global_score']:.2f})" if "val_fusion" in metrics else "") +
              f", ETA {epoch_s * (settings.epochs - epoch - 1):.0f} s")
        with tempfile.TemporaryDirectory() as folder:
            task.save(core_model, epoch + 1, metrics, Path(folder))
            torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch,
                        "schedulers": {name: scheduler.state_dict() for name, scheduler in schedulers.items()},
                        "history": history}, Path(folder) / "trainer.pt")
            ray.train.report({k: v for k, v in metrics.items() if k != "val_metrics"},
                             checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
    if writer is not None:
        writer.close()


def remove_unrecorded_checkpoints(run_dir: str) -> list[str]:
    """Delete ``epoch_*`` folders of a run that Ray Train never recorded (written by workers that went on after
    their driver was killed), so a resumed run neither sees nor mixes with them; returns what was removed.

    Ray Train resumes from the checkpoints its checkpoint-manager snapshot lists; anything else is debris.
    """
    import json

    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir)
    if not fs.exists(path):
        return []
    snapshot = f"{path}/checkpoint_manager_snapshot.json"
    # Only what the snapshot proves unrecorded goes: with no readable snapshot (none yet, a Ray that names it
    # otherwise, a damaged file) nothing can be proved, and checkpoints may be the only copy of trained weights.
    try:
        with fs.open(snapshot, "r") as f:
            state = json.load(f)
        results = state["checkpoint_results"] + [state.get("latest_checkpoint_result") or {}]
        recorded = {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        kept = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)
                if e.rstrip("/").rsplit("/", 1)[-1].startswith("epoch_")]
        if kept:
            log.warning("%s: no readable Ray Train checkpoint record (%s); checkpoint folders kept as they are: %s",
                        run_dir, err.__class__.__name__, sorted(kept))
        return []
    removed = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("epoch_") and name not in recorded:
            fs.rm(entry, recursive=True)
            removed.append(name)
    if removed:
        log.warning("%s: removed checkpoint folders Ray Train never recorded (written after the run was stopped): %s",
                    run_dir, sorted(removed))
    return sorted(removed)


def finished_run(run_dir: str, epochs: int):
    """The Ray Train Result of the run at ``run_dir`` when its latest recorded checkpoint is of its last epoch, read
    from storage (None otherwise): a finished run is returned without starting a trainer, its placement group and
    its workers."""
    import fsspec
    from ray.train import Result

    fs, path = fsspec.core.url_to_fs(run_dir)
    if not fs.exists(f"{path}/checkpoint_manager_snapshot.json"):
        return None
    result = Result.from_path(run_dir)
    if not result.metrics or result.metrics.get("epoch") != epochs:
        return None
    log.info("%s: finished (epoch %d of %d), reused", run_dir, result.metrics["epoch"], epochs)
    return result


def fit(cfg, table: FeatureStore | None, rows: dict, val: dict | None, name: str, settings: TrainSettings,
        task: str = "features", task_config: dict | None = None, resources: StageResources | None = None):
    """Train (or resume, or return a finished run) under ``cfg.storage_path / name``; the Ray Train Result.

    ``rows``: ``ids``, ``labels``, ``neighbours``, ``anchors`` of the training table (see ``sampler``).
    ``task``: ``features`` (RRT on the table's descriptors) or ``joint`` (backbone + RRT from images; then
    ``task_config`` holds ``stage``, ``init`` (a ``joint.pt`` to start from, or None), ``backbone`` (name and
    options of a dense-grid extractor), ``crop_scale`` and ``data_cpus``), or ``metric`` (an extractor trained
    with a metric-learning loss, no table: ``rows`` holds ``uris`` and ``labels``; ``task_config`` holds
    ``metric``, ``backbone``, ``structural``, ``crop_scale`` and ``data_cpus``).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    resources = resources or StageResources()       # of each worker (ray.train)
    gpus = resources.gpus(cfg.num_workers)
    run_dir = f"{storage}/{name}"
    remove_unrecorded_checkpoints(run_dir)
    finished = finished_run(run_dir, settings.epochs)
    if finished is not None:
        return finished
    config = {"settings": asdict(settings), "table": None if table is None else (table.uri, table.version),
              "rows": ray.put(rows),
              "val": None if val is None else ray.put(val), "val_k": cfg.val_depth,
              "tensorboard_dir": f"{run_dir}/tensorboard", "fail_at_epoch": cfg.fail_at_epoch,
              "fail_at_step": cfg.get("fail_at_step", 0),
              "fail_marker": f"{run_dir}/injected-failure", "task": task, **(task_config or {})}
    trainer = TorchTrainer(
        train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": resources.num_cpus, **({"GPU": gpus} if gpus else {}),
                                                           **resources.resources}),
        # Progress comes from the epoch lines (logged, not printed: Ray Train tees worker prints to stdout and to
        # its logger, which showed each line twice); its own per-report INFO lines are noise on a console.
        run_config=RunConfig(name=name, storage_path=storage, logging_config=LoggingConfig(log_level="WARNING"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                                checkpoint_score_attribute="val_score" if val else None,
                                                                checkpoint_score_order="max")))
    return trainer.fit()
