"""Metric-learning training of an extractor with global + structural similarity (DIML; the ViT-reranking
paper's Tables 2 and 3), the part without Ray: the model, the similarities the losses see, the losses
(pytorch-metric-learning), one step (data-parallel aware), class-balanced batches, validation and export.

The model (``MetricEmbedder``) is the ``dense-grid`` extractor (ResNet-50, DIML) or the ``vit`` one (CvT-13,
DeiT-S, Swin-T) made trainable: every cell of the backbone's last feature map, or every patch token pooled to
the grid, through a trainable linear projection to ``dim`` (128). The global embedding is the projected CLS
token where there is one, else the normalised mean of the projected cells (what the extractor stores as its
global); the structural side is the normalised cells.

How the structural term enters training (DIML's criteria, "equal weights" in the paper): for a pair of
images, a transport plan ``T`` between their cells is computed without gradient, with the structural
reranker's own transport (:func:`rrt_dist.rerank.structural.transport_plans`, ``reranker.structural``),
and the loss sees

    similarity  (G + S) / 2,  S = sum(T * <cells_a, cells_b>)                  (multi-similarity)
    distance    (D_G + sum(T * ||cells_a - cells_b||)) / 2,  D = sqrt(2 - 2 cos)  (margin, triplet)

on every pair of the batch: the Sinkhorn plan decides which cells are compared, the gradient flows through
the cells. Margin and triplet triplets are mined on the global embedding (DIML's distance-weighted miner on
the pooled feature); multi-similarity mines on the similarity it optimises. Test-time truncation (the
paper's K = 100: only the global top-K get the structural term) is the structural reranker's ``k``.

Data parallel: each worker embeds its share of the batch; the embeddings of all workers are gathered in rank
order (the local slice keeps its gradient), every worker computes the loss of the whole batch (miners seeded
per step, so all draw the same tuples) and scales it by the world size, so DDP's averaged gradient is the
gradient of the single-process loss on the union batch. The loss's own parameters (the margin loss's
per-class beta) live outside DDP: their gradient is already whole on every worker and only the scale is
undone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rrt_dist.features.base import normalised
from rrt_dist.schema import MetricSettings

TRAINABLE_EXTRACTORS = ("dense-grid", "vit")


def _affine(mean: np.ndarray, proj: np.ndarray) -> nn.Linear:
    """The extractor's fixed ``(x - mean) @ proj`` as a trainable linear layer."""
    mean, proj = torch.as_tensor(mean), torch.as_tensor(proj)                   # [C], [C, dim]
    layer = nn.Linear(proj.shape[0], proj.shape[1])
    with torch.no_grad():
        layer.weight.copy_(proj.T)
        layer.bias.copy_(-(mean @ proj))
    return layer


class MetricEmbedder(nn.Module):
    """A ``dense-grid`` or ``vit`` extractor made trainable: its cells (the CNN's last-map cells, or the
    transformer's patch tokens pooled to its grid) through a trainable projection to ``dim``, starting as the
    extractor's own. The global is the projected CLS token (its own projection) where the model has one, else
    the mean of the projected cells (the projection of the map's mean, as the extractor computes it)."""

    def __init__(self, extractor):
        super().__init__()
        if extractor.name not in TRAINABLE_EXTRACTORS:
            raise ValueError(f"metric learning trains a {' or '.join(TRAINABLE_EXTRACTORS)} extractor, "
                             f"not {extractor.name!r}")
        self.backbone, self.mean, self.std = extractor.model, extractor.cfg.mean, extractor.cfg.std
        self.project_global = None
        if extractor.name == "dense-grid":
            self.last = extractor.last
        else:
            if not extractor.cfg.dim:
                raise ValueError("a vit extractor is trained with an embedding projection: set backbone.options.dim "
                                 "(128 in the paper's recipe)")
            self.tokens = extractor.tokens                 # reads extractor.model, which is self.backbone
            if extractor.has_cls:
                self.project_global = _affine(extractor.g_mean, extractor.g_proj)
        self.project = _affine(extractor.l_mean, extractor.l_proj)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global ``[B, dim]``, cells ``[B, R, dim]``), projected, not normalised, of normalised images."""
        if self.project_global is None and not hasattr(self, "tokens"):
            (fmap,) = self.backbone.forward_intermediates(images, indices=[self.last], intermediates_only=True)
            cells = self.project(fmap.flatten(2).transpose(1, 2))
            return cells.mean(dim=1), cells
        glob, tokens = self.tokens(images)
        cells = self.project(tokens)
        return (cells.mean(dim=1) if self.project_global is None else self.project_global(glob)), cells


def set_train_mode(model: MetricEmbedder, freeze_batchnorm: bool) -> None:
    """Training mode; with ``freeze_batchnorm`` every BatchNorm stays in eval mode (statistics kept)."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def embeddings(glob: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global ``[B, dim]``, patches ``[B, R, dim]``), both L2-normalised."""
    return F.normalize(glob, dim=-1), F.normalize(cells, dim=-1)


def pack(globals_: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """One row per image, ``[global | patches]``, the form pytorch-metric-learning passes to a distance."""
    return torch.cat([globals_, patches.flatten(1)], dim=1)


def _unpack(packed: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return packed[:, :dim], packed[:, dim:].reshape(len(packed), -1, dim)


def _euclidean(cos: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((2 - 2 * cos).clamp_min(0) + 1e-6)


def _combine(plan: torch.Tensor, cell_cos: torch.Tensor, global_cos: torch.Tensor, form: str) -> torch.Tensor:
    if form == "cosine":
        return (global_cos + (plan * cell_cos).sum(dim=(-2, -1))) / 2
    return (_euclidean(global_cos) + (plan * _euclidean(cell_cos)).sum(dim=(-2, -1))) / 2


def _plans(query_patches, query_global, ref_patches, ref_globals, structural: dict) -> torch.Tensor:
    from rrt_dist.rerank.structural import transport_plans

    with torch.no_grad():
        return transport_plans(query_patches.detach(), query_global.detach(), ref_patches.detach(),
                               ref_globals.detach(), **structural)["plan"]


def _scores(q_global, q_patches, r_globals, r_patches, structural: dict, form: str) -> torch.Tensor:
    """``[M]`` global + structural similarity / distance of one query against M references."""
    plan = _plans(q_patches, q_global, r_patches, r_globals, structural)           # [M, R_ref, R_query]
    return _combine(plan, torch.einsum("mac,bc->mab", r_patches, q_patches), r_globals @ q_global, form)


def structural_matrix(query: torch.Tensor, ref: torch.Tensor, dim: int, structural: dict,
                      form: str = "cosine") -> torch.Tensor:
    """``[N, M]`` global + structural similarity (``cosine``) or distance (``euclidean``) between packed rows."""
    qg, qp = _unpack(query, dim)
    rg, rp = _unpack(ref, dim)
    return torch.stack([_scores(qg[i], qp[i], rg, rp, structural, form) for i in range(len(query))])


def structural_pairs(query: torch.Tensor, ref: torch.Tensor, dim: int, structural: dict,
                     form: str = "cosine") -> torch.Tensor:
    """``[N]`` the same for the pairs ``(query[i], ref[i])``."""
    qg, qp = _unpack(query, dim)
    rg, rp = _unpack(ref, dim)
    return torch.stack([_scores(qg[i], qp[i], rg[i:i + 1], rp[i:i + 1], structural, form)[0]
                        for i in range(len(query))])


def structural_distance(dim: int, structural: dict, form: str):
    """A pytorch-metric-learning distance over packed rows: G+S similarity (``cosine``, inverted) or distance."""
    from pytorch_metric_learning.distances import BaseDistance

    class StructuralDistance(BaseDistance):
        def __init__(self):
            super().__init__(normalize_embeddings=False, is_inverted=form == "cosine")

        def compute_mat(self, query_emb, ref_emb):
            return structural_matrix(query_emb, query_emb if ref_emb is None else ref_emb, dim, structural, form)

        def pairwise_distance(self, query_emb, ref_emb):
            return structural_pairs(query_emb, ref_emb, dim, structural, form)

    return StructuralDistance()


class Objective(nn.Module):
    """The loss of ``settings.loss`` on global (G) or global + structural (G+S) similarity, with its miner.

    Its parameters (the margin loss's per-class beta) are trained with ``beta_lr``; ``n_classes`` are the
    training classes, labels ``0..n_classes-1``.
    """

    def __init__(self, settings: MetricSettings, n_classes: int, dim: int, structural: dict):
        super().__init__()
        from pytorch_metric_learning import distances, losses, miners

        self.settings, self.dim = settings, dim
        s = settings
        if s.loss == "multisimilarity":
            distance = structural_distance(dim, structural, "cosine") if s.structural else distances.CosineSimilarity()
            self.loss = losses.MultiSimilarityLoss(alpha=s.ms_alpha, beta=s.ms_beta, base=s.ms_base, distance=distance)
            self.miner = miners.MultiSimilarityMiner(epsilon=s.ms_epsilon, distance=distance)
            self.mine_on_global = False
        else:
            distance = structural_distance(dim, structural, "euclidean") if s.structural else distances.LpDistance()
            self.loss = (losses.MarginLoss(margin=s.margin, nu=0, beta=s.beta, learn_beta=True, num_classes=n_classes,
                                           distance=distance) if s.loss == "margin"
                         else losses.TripletMarginLoss(margin=s.margin, distance=distance))
            self.miner = miners.DistanceWeightedMiner(cutoff=s.cutoff, nonzero_loss_cutoff=s.nonzero_loss_cutoff)
            self.mine_on_global = True

    def forward(self, globals_: torch.Tensor, patches: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
        from pytorch_metric_learning.utils import common_functions

        rows = pack(globals_, patches) if self.settings.structural else globals_
        # Miners draw with torch's generator (the distance-weighted one) or pytorch-metric-learning's numpy one:
        # both seeded per step, so every worker, a resumed run and a single-process run of the union batch draw
        # the same tuples.
        common_functions.NUMPY_RANDOM = np.random.RandomState(seed % 2 ** 32)
        with torch.random.fork_rng(devices=[labels.device] if labels.is_cuda else []):
            torch.manual_seed(seed)
            tuples = self.miner(globals_ if self.mine_on_global else rows, labels)
        return self.loss(rows, labels, tuples)


def gather_ranks(x: torch.Tensor) -> torch.Tensor:
    """All workers' ``x`` concatenated in rank order, this worker's slice keeping its gradient (no-op alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def batch_precision_at_1(globals_: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the batch whose nearest other image (global cosine) has its label: a training-side signal."""
    sim = globals_.detach() @ globals_.detach().T
    sim.fill_diagonal_(-float("inf"))
    return float((labels[sim.argmax(dim=1)] == labels).float().mean())


def metric_step(model: nn.Module, objective: Objective, optimizer, images: torch.Tensor, labels: torch.Tensor,
                seed: int, world_size: int = 1, grad_clip: float | None = None) -> dict:
    """One step on this worker's images (see the module doc for the data-parallel form). Returns loss and the
    batch's P@1."""
    optimizer.zero_grad(set_to_none=True)
    globals_, patches = embeddings(*model(images))
    all_globals, all_patches, all_labels = (gather_ranks(x) for x in (globals_, patches, labels))
    loss = objective(all_globals, all_patches, all_labels, seed)
    (loss * world_size).backward()
    for p in objective.parameters():           # whole on every worker, outside DDP: undo the scale only
        if p.grad is not None:
            p.grad /= world_size
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return {"loss": float(loss.detach()), "accuracy": batch_precision_at_1(all_globals, all_labels)}


def optimizer_for(model: nn.Module, objective: Objective, lr: float, weight_decay: float, beta_lr: float):
    """Adam (L2 weight decay, as the reference) on the model; the loss's parameters at ``beta_lr``, no decay."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]
    extra = [p for p in objective.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "lr": beta_lr, "weight_decay": 0.0})
    return torch.optim.Adam(groups)


# ----------------------------------------------------------------------------- batches

def class_balanced_batches(labels: np.ndarray, per_class: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """``[n_batches, batch_size]`` row indices of one epoch: each batch ``batch_size / per_class`` distinct
    classes, ``per_class`` distinct images of each, consecutive (a worker's share of a batch keeps classes
    whole); as many batches as the images fill. Seeded by (seed, epoch), so a resumed epoch repeats."""
    if batch_size % per_class:
        raise ValueError(f"batch size {batch_size} is not a multiple of {per_class} images per class")
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    usable = np.flatnonzero(counts >= per_class)
    n_classes = batch_size // per_class
    if len(usable) < n_classes:
        raise ValueError(f"a batch of {batch_size} needs {n_classes} classes with >= {per_class} images; "
                         f"the training set has {len(usable)}")
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    rng = np.random.default_rng([seed, epoch, 3])
    batches = []
    for _ in range(len(labels) // batch_size):
        chosen = rng.choice(usable, size=n_classes, replace=False)
        batches.append(np.concatenate([rng.choice(members[c], size=per_class, replace=False) for c in chosen]))
    return np.asarray(batches, np.int64).reshape(-1, batch_size)


def worker_share(batches: np.ndarray, rank: int, world_size: int, per_class: int) -> np.ndarray:
    """This worker's consecutive slice of every batch (whole classes)."""
    size = batches.shape[1] // world_size
    if batches.shape[1] % world_size or size % per_class:
        raise ValueError(f"a batch of {batches.shape[1]} does not split into {world_size} workers' shares of whole "
                         f"classes ({per_class} images each)")
    return batches[:, rank * size:(rank + 1) * size]


def decode_images(batch: dict, image_size: int, scale: tuple[float, float]) -> dict:
    """``map_batches`` function: URIs -> the training augmentation (seeded random resized crop + flip), labels
    and step seeds passed through."""
    from rrt_dist.features.images import load_image

    from .joint import train_crop

    return {"image": np.stack([train_crop(load_image(uri), image_size, scale, int(seed))
                               for uri, seed in zip(batch["uri"], batch["seed"])]),
            "label": batch["label"], "step_seed": batch["step_seed"]}


def image_batch(decoded: dict, mean, std) -> dict[str, torch.Tensor]:
    return {"images": normalised(torch.from_numpy(np.array(decoded["image"])), mean, std),
            "labels": torch.as_tensor(decoded["label"], dtype=torch.long),
            "seed": torch.as_tensor(int(decoded["step_seed"][0]))}


# ----------------------------------------------------------------------------- validation and export

@torch.inference_mode()
def embed_features(model: MetricEmbedder, images: np.ndarray, batch_size: int = 32) -> dict:
    """Stored-feature layout (``take_locals``) of prepared uint8 ``[N, S, S, 3]`` ``images`` under the current
    model (the grid's cells at their positions in the S x S input)."""
    from rrt_dist.features.grid import grid_positions

    device = next(model.parameters()).device
    parts = [model(normalised(torch.as_tensor(images[s:s + batch_size], device=device), model.mean, model.std))
             for s in range(0, len(images), batch_size)]
    globals_, patches = embeddings(torch.cat([g for g, _ in parts]), torch.cat([c for _, c in parts]))
    n, width = patches.shape[:2]
    side = int(round(np.sqrt(width)))
    positions = grid_positions(side, side, images.shape[1])
    return {"global": globals_.cpu().numpy(), "local": patches.cpu().numpy(),
            "positions": np.broadcast_to(positions, (n, width, 2)).copy(), "scales": np.zeros((n, width), np.int64),
            "n_local": np.full(n, width), "mask": np.zeros((n, width), bool)}


def retrieval_metrics(bench, features: dict, structural: dict, k: int) -> dict:
    """Leave-one-out metrics of ``bench`` (a metric-learning benchmark, query set = gallery) from in-memory
    features: ``global`` (cosine ranking) and ``structural`` (its top-``k`` reranked by the structural
    reranker: structural + global similarity)."""
    from rrt_dist.eval.runner import global_rankings, rerank_and_evaluate
    from rrt_dist.index.exact import exact_searcher
    from rrt_dist.rerank.core import RerankCore
    from rrt_dist.store import MemoryFeatures

    ids = bench.gallery.column("id").to_numpy()
    table = MemoryFeatures(ids, features)
    ranked, scores = global_rankings(bench, ids, features["global"], {"gallery": table}, None, False,
                                     search=exact_searcher(features["global"], ids))
    core = RerankCore("structural", structural, table, [table])
    return {"global": bench.evaluate(ranked),
            "structural": rerank_and_evaluate(bench, ids, ranked, scores, core.rerank, k)}


def export_extractor(model: MetricEmbedder, folder: str | Path) -> dict:
    """Write the trained model as extractor options (``dense-grid`` or ``vit``): ``checkpoint`` (the backbone's
    state dict, or a saved Hugging Face model folder for CvT-13), ``local_projection`` and ``global_projection``
    (the same file where the global is the projected cells' mean)."""
    from .joint import write_projection

    folder = Path(folder)
    if hasattr(model.backbone, "save_pretrained"):                         # CvT-13 (transformers)
        model.backbone.save_pretrained(folder / "backbone")
        checkpoint = folder / "backbone"
    else:
        checkpoint = folder / "backbone.pt"
        torch.save(model.backbone.state_dict(), checkpoint)
    local = write_projection(model.project, folder / "local_projection.npz")
    glob = local if model.project_global is None else write_projection(model.project_global,
                                                                        folder / "global_projection.npz")
    return {"checkpoint": str(checkpoint), "local_projection": local, "global_projection": glob}
