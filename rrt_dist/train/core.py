"""RRT training, the part without Ray: batches of pairs from a feature table, the loss, one step, one epoch,
validation on a held-out benchmark and the checkpoint format.

A step takes ``batch_size`` triplets (anchor, positive, negative) and scores the 2 x batch_size pairs
(anchor, positive) -> 1 and (anchor, negative) -> 0 with binary cross-entropy on the logits, as the paper.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from rrt_dist.models.rrt import RerankingTransformer
from rrt_dist.rerank.scorers import truncate_locals
from rrt_dist.schema import TrainSettings
from rrt_dist.store import FeatureStore

from .sampler import anchor_shard, sample_triplets

PAIR_FIELDS = ("global", "local", "mask", "scales", "positions")


def pair_batch(features: dict, rows: np.ndarray, triplets: np.ndarray) -> dict[str, torch.Tensor]:
    """Model inputs for ``triplets`` (``[b, 3]`` table rows) given ``features`` of the distinct ``rows``.

    Pairs ``0..b-1`` are (anchor, positive), ``b..2b-1`` (anchor, negative); ``target`` holds 1 / 0.
    """
    where = {r: i for i, r in enumerate(rows.tolist())}
    anchor = [where[r] for r in triplets[:, 0]] * 2
    other = [where[r] for r in np.concatenate([triplets[:, 1], triplets[:, 2]])]
    dtypes = {"mask": torch.bool, "scales": torch.long}
    batch = {}
    for side, index in (("src", anchor), ("tgt", other)):
        for name in PAIR_FIELDS:
            batch[f"{side}_{name}"] = torch.as_tensor(features[name][index]).to(dtypes.get(name, torch.float32))
    b = len(triplets)
    batch["target"] = torch.cat([torch.ones(b), torch.zeros(b)])
    return batch


def pair_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    s, t = "src_", "tgt_"
    return model(batch[s + "global"], batch[s + "local"], batch[s + "mask"], batch[s + "scales"],
                 batch[t + "global"], batch[t + "local"], batch[t + "mask"], batch[t + "scales"],
                 src_positions=batch[s + "positions"], tgt_positions=batch[t + "positions"])


def pair_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE-with-logits over the batch's pairs, and the logits."""
    logits = pair_logits(model, batch)
    return F.binary_cross_entropy_with_logits(logits, batch["target"]), logits


def train_step(model, optimizer, batch: dict, grad_clip: float | None, loss_fn=pair_loss) -> dict:
    """Forward, backward, clip, step, in the modes the caller set (a frozen backbone stays in eval mode).
    Returns loss and pair accuracy (logit > 0 means 'same')."""
    optimizer.zero_grad(set_to_none=True)
    loss, logits = loss_fn(model, batch)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return {"loss": float(loss.detach()), "accuracy": float(((logits.detach() > 0) == (batch["target"] > 0)).float().mean())}


class TripletBatches:
    """An epoch's batches for one worker, read from the training table with the next batch prefetched.

    ``ids[r]`` is the table id of training row ``r``; descriptors come from one Lance ``take`` per batch.
    """

    def __init__(self, store: FeatureStore, ids: np.ndarray, max_local: int | None):
        self.store, self.ids, self.max_local = store, np.asarray(ids, np.int64), max_local
        self.pool = ThreadPoolExecutor(max_workers=1)

    def load(self, triplets: np.ndarray) -> dict:
        rows = np.unique(triplets)
        features = self.store.take_locals(self.ids[rows])
        if self.max_local:
            features = truncate_locals(features, self.max_local)
        return pair_batch(features, rows, triplets)

    def epoch(self, triplets: np.ndarray, batch_size: int):
        """Yields ``(batch, seconds waited for it)``; the last partial batch is dropped (equal steps on every worker)."""
        starts = list(range(0, len(triplets) - batch_size + 1, batch_size))
        pending = self.pool.submit(self.load, triplets[:batch_size]) if starts else None
        for n, s in enumerate(starts):
            t = time.perf_counter()
            batch = pending.result()
            waited = time.perf_counter() - t
            if n + 1 < len(starts):
                pending = self.pool.submit(self.load, triplets[starts[n + 1]:starts[n + 1] + batch_size])
            yield batch, waited


def epoch_triplets(anchors, neighbours, labels, settings: TrainSettings, epoch: int, rank: int,
                   world_size: int) -> np.ndarray:
    """This worker's triplets for ``epoch``: its disjoint anchor shard, positives / negatives drawn with a
    generator seeded by (seed, epoch, rank) so a resumed run draws what the original would have."""
    shard = anchor_shard(anchors, epoch, settings.seed, rank, world_size)
    rng = np.random.default_rng([settings.seed, epoch, rank, 1])
    return sample_triplets(shard, neighbours, labels, rng, settings.positive_scope)


def build_model(settings: TrainSettings, global_dim: int, local_dim: int) -> RerankingTransformer:
    """A fresh RRT for descriptors of these sizes; the same seed gives the same weights on every worker.

    The segment and scale embeddings start small (std 0.02, as BERT's): with nn.Embedding's N(0, 1)
    they have norm ~11 against the unit-norm descriptors they are added to, and on the synthetic
    training split the loss stayed at ln 2 for 30 epochs; with the small start it falls from epoch 2.

    ``match_init`` > 0 starts every layer's query and key projections at that multiple of the identity,
    so attention begins as descriptor similarity: each local attends to its likely matches in the
    other image, the evidence a reranker has to learn to count. With the default random start, a
    few hundred steps on a small training set learn to recognise its landmarks rather than to match
    (see docs/benchmarks.md: the demo's RRT fell below global-only on the test split).
    """
    torch.manual_seed(settings.seed)
    model = RerankingTransformer(**{"global_dim": global_dim, "local_dim": local_dim, **settings.model})
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=settings.embedding_init_std)
    if settings.match_init:
        dim = model.cfg.model_dim
        with torch.no_grad():
            for layer in model.encoder.layers:
                layer.self_attn.in_proj_weight[:2 * dim] = settings.match_init * torch.eye(dim).repeat(2, 1)
    return model


def lr_schedulers(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> dict:
    """The learning-rate schedule as torch schedulers whose factors multiply: ``epoch`` (MultiStepLR at
    ``milestones``, stepped after each epoch) and, with ``warmup_steps`` > 1, ``step`` (LinearLR: step k of the
    first ``warmup_steps`` runs at lr * (k + 1) / warmup_steps; stepped after each optimizer step)."""
    schedulers = {"epoch": torch.optim.lr_scheduler.MultiStepLR(optimizer, settings.milestones, settings.gamma)}
    if settings.warmup_steps > 1:
        schedulers["step"] = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / settings.warmup_steps, 1.0,
                                                               settings.warmup_steps - 1)
    return schedulers


def model_checkpoint(model: torch.nn.Module, settings: TrainSettings, epoch: int, metrics: dict) -> dict:
    """What ``model.pt`` holds: the state dict under ``state`` (the released checkpoints' layout, so
    ``load_released_checkpoint`` reads it) plus the locals per image, the epoch's metrics and the weight of the
    global cosine its scorer adds to the logit (``global_fusion``: the one its validation chose; else 0)."""
    fusion_weight = metrics.get("val_fusion", {}).get("global_weight") if settings.global_fusion else None
    return {"state": model.state_dict(), "max_local": settings.top_locals, "epoch": epoch, "metrics": metrics,
            "config": dict(vars(model.cfg)), "global_weight": fusion_weight or 0.0}


def load_trainer_state(folder) -> dict:
    """A checkpoint's ``trainer.pt`` (optimizer, scheduler, epoch, history): tensors and plain containers only,
    loaded with ``weights_only`` so that a planted object in the file cannot run code."""
    from pathlib import Path

    return torch.load(Path(folder) / "trainer.pt", map_location="cpu", weights_only=True)


def validation_score(metrics: dict) -> float:
    """One number to select checkpoints by: mean of Medium and Hard mAP (revisitop), else mAP / MAP@R."""
    if "medium" in metrics:
        return (metrics["medium"]["mAP"] + metrics["hard"]["mAP"]) / 2
    return metrics["mAP"] if "mAP" in metrics else metrics["MAP@R"]


# Weights of the global cosine added to the RRT logit that validation tries. Logits span a few units (more as
# training sharpens them), the cosines of a query's top-K differ by hundredths: from a nudge to (at 1024) the
# global order with the RRT deciding only among near-ties.
FUSION_WEIGHTS = tuple(2.0 ** e for e in range(-1, 11))


def validate(model: torch.nn.Module, val: dict, k: int, max_local: int | None = None) -> dict:
    """Rerank the global top-``k`` of the validation benchmark with ``model`` (fed ``max_local`` locals per
    image, as in training); its metrics and ``score``, and under ``fusion`` the ``global_weight`` (0 or one of
    ``FUSION_WEIGHTS``) whose logit + weight × global cosine order scores best, with that ``score`` and the
    global order's (``global_score``).

    ``val`` (see ``rrt_dist.train.validation_set``): ``bench``, ``query_ids`` (row order), ``ranked``,
    ``scores`` and the ``query`` / ``gallery`` tables as (uri, version).
    """
    from rrt_dist.eval.runner import rerank_and_evaluate
    from rrt_dist.rerank.core import RerankCore

    device = str(next(model.parameters()).device)
    core = RerankCore("rrt", {"model": model, "device": device, "top_locals": max_local, "global_weight": 0.0},
                      val["query"], val["gallery"])
    was_training = model.training
    model.eval()

    def evaluate(rerank=core.rerank) -> dict:
        return rerank_and_evaluate(val["bench"], val["query_ids"], val["ranked"], val["scores"], rerank, k)

    metrics = evaluate()
    model.train(was_training)
    # The fusion weight (exported with train.global_fusion): each weight reorders the logits the first
    # pass cached, so this costs no forward pass; the smallest of equally good weights wins.
    fused = {0.0: validation_score(metrics)}
    for weight in FUSION_WEIGHTS:
        core.global_weight = weight
        fused[weight] = validation_score(evaluate())
    weight = max(fused, key=lambda w: (fused[w], -w))
    global_only = validation_score(evaluate(lambda query_ids, ranked, scores, k: ranked))
    return {"metrics": metrics, "score": validation_score(metrics),
            "fusion": {"global_weight": weight, "score": fused[weight], "global_score": global_only}}
