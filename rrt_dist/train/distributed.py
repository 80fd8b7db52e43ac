"""RRT training on N Ray Train workers (DDP: gloo on CPU, NCCL on GPU), checkpointed every epoch.

The driver puts the training rows (ids, labels, global neighbours, anchors) and the validation set in
the object store; each worker reads descriptors from the Lance table itself, trains on its own
disjoint anchor shard, and rank 0 validates, writes TensorBoard scalars and the checkpoint:

    <storage_path>/<name>/epoch_NNN/model.pt     loadable by rrt_dist.models.load_released_checkpoint
    <storage_path>/<name>/epoch_NNN/trainer.pt   optimizer, scheduler, history (for resuming)
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

from rrt_dist.store import FeatureStore

from .core import TrainSettings, TripletBatches, build_model, epoch_triplets, model_checkpoint, train_step, validate

log = logging.getLogger(__name__)


def _restore(model, optimizer, scheduler) -> tuple[int, list]:
    """Load the latest checkpoint if this run has one: (first epoch to train, history so far)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "trainer.pt", map_location="cpu", weights_only=False)
        weights = torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=True)["state"]
    getattr(model, "module", model).load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1, state["history"]


def _maybe_fail(config: dict, epoch: int, rank: int, world_size: int) -> None:
    """Fault injection: the last worker dies (once per run) when ``epoch`` starts, after the previous
    epoch's checkpoint is committed (a crash before that would, rightly, resume from the one before)."""
    if config.get("fail_at_epoch") != epoch or rank != world_size - 1:
        return
    marker = Path(config["fail_marker"])
    if not marker.exists():
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)


def train_worker(config: dict) -> None:
    """Ray Train worker loop."""
    import ray.train.torch
    from torch.utils.tensorboard import SummaryWriter

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    settings = TrainSettings(**config["settings"])
    rows = ray.get(config["rows"])
    val = ray.get(config["val"]) if rank == 0 and config["val"] is not None else None
    store = FeatureStore(*config["table"])
    model = ray.train.torch.prepare_model(build_model(settings, store.global_dim, store.local_dim))
    core_model = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, settings.milestones, settings.gamma)
    start, history = _restore(model, optimizer, scheduler)
    if start and rank == 0:
        print(f"resuming at epoch {start + 1}/{settings.epochs} from the latest checkpoint")
    device = ray.train.torch.get_device()
    batches = TripletBatches(store, rows["ids"], settings.max_local)
    writer = SummaryWriter(config["tensorboard_dir"]) if rank == 0 else None

    for epoch in range(start, settings.epochs):
        _maybe_fail(config, epoch, rank, world_size)
        triplets = epoch_triplets(rows["anchors"], rows["neighbours"], rows["labels"], settings, epoch, rank,
                                  world_size)
        losses, accuracies, data_s, step_s = [], [], 0.0, 0.0
        t_epoch = time.perf_counter()
        n_steps = len(triplets) // settings.batch_size
        for step, (batch, waited) in enumerate(batches.epoch(triplets, settings.batch_size)):
            t = time.perf_counter()
            out = train_step(model, optimizer, {k: v.to(device) for k, v in batch.items()}, settings.grad_clip)
            step_s += time.perf_counter() - t
            data_s += waited
            losses.append(out["loss"])
            accuracies.append(out["accuracy"])
            if rank == 0 and n_steps >= 50 and (step + 1) % (n_steps // 10) == 0:   # long epochs: progress
                elapsed = time.perf_counter() - t_epoch
                print(f"  epoch {epoch + 1} step {step + 1}/{n_steps}: loss {np.mean(losses[-50:]):.4f}, "
                      f"ETA {elapsed * (n_steps - step - 1) / (step + 1):.0f} s")
        scheduler.step()
        train_s = time.perf_counter() - t_epoch
        steps = len(losses)
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "accuracy": float(np.mean(accuracies)) if accuracies else float("nan"),
                   "steps": steps, "pairs_per_s": 2 * steps * settings.batch_size * world_size / max(train_s, 1e-9),
                   "data_s_per_step": data_s / max(steps, 1), "compute_s_per_step": step_s / max(steps, 1),
                   "lr": scheduler.get_last_lr()[0], "resumed_after": start}   # epochs done when this attempt began
        if rank != 0:
            ray.train.report(metrics)
            continue
        if val is not None:
            t = time.perf_counter()
            result = validate(core_model, val, config["val_k"], settings.max_local)
            metrics.update(val_score=result["score"], val_metrics=result["metrics"], val_s=time.perf_counter() - t)
        history.append(metrics)
        for key in ("loss", "accuracy", "pairs_per_s", "val_score"):
            if key in metrics:
                writer.add_scalar(key, metrics[key], epoch + 1)
        writer.flush()
        epoch_s = time.perf_counter() - t_epoch
        print(f"epoch {epoch + 1}/{settings.epochs}: loss {metrics['loss']:.4f}, pair accuracy {metrics['accuracy']:.3f}, "
              f"{metrics['pairs_per_s']:.1f} pairs/s" +
              (f", validation {100 * metrics['val_score']:.2f}" if "val_score" in metrics else "") +
              f", ETA {epoch_s * (settings.epochs - epoch - 1):.0f} s")
        with tempfile.TemporaryDirectory() as folder:
            torch.save(model_checkpoint(core_model, settings, epoch + 1, metrics), Path(folder) / "model.pt")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                        "history": history}, Path(folder) / "trainer.pt")
            ray.train.report({k: v for k, v in metrics.items() if k != "val_metrics"},
                             checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
    if writer is not None:
        writer.close()


def fit(cfg, table: FeatureStore, rows: dict, val: dict | None, name: str, settings: TrainSettings):
    """Train (or resume, or return a finished run) under ``cfg.storage_path / name``; the Ray Train Result.

    ``rows``: ``ids``, ``labels``, ``neighbours``, ``anchors`` of the training table (see ``sampler``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= cfg.num_workers
    run_dir = f"{storage}/{name}"
    config = {"settings": asdict(settings), "table": (table.uri, table.version), "rows": ray.put(rows),
              "val": None if val is None else ray.put(val), "val_k": cfg.val_k,
              "tensorboard_dir": f"{run_dir}/tensorboard", "fail_at_epoch": cfg.fail_at_epoch,
              "fail_marker": f"{run_dir}/injected-failure"}
    trainer = TorchTrainer(
        train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                                checkpoint_score_attribute="val_score" if val else None,
                                                                checkpoint_score_order="max")))
    return trainer.fit()
