"""Joint finetuning of a dense-grid backbone with RRT (the paper's SOP experiment, Table 6), the part
without Ray: the model, its two stages, image triplets, the loss, validation on re-extracted locals
and the exported weights.

``JointReranker`` computes the same locals as the ``dense-grid`` extractor (last feature map, every
cell, the extractor's projection to 128-d as a trainable linear layer, L2-normalised) but
differentiably, and scores pairs with an RRT in the SOP setting (no global tokens, 2-D sine
position embedding of the cells' positions in the network input). Stages (``set_stage``):

* ``frozen``: the backbone is fixed (no gradients, eval mode); projection and RRT train;
* ``finetune``: the backbone trains too, with every BatchNorm kept in eval mode (running statistics
  frozen), the loss still on the reranker's logits only. The paper starts it from the frozen stage.

Training images get the paper's augmentation (a random crop resized to the input size, then a
random flip), seeded per image so a resumed epoch sees the same crops; validation images get the
extractor's own preparation, so validation sees the locals extraction would store.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import RandomResizedCrop

from rrt_dist.features.base import normalised
from rrt_dist.features.core import decode_and_prepare
from rrt_dist.features.grid import DenseGrid, grid_positions
from rrt_dist.features.images import load_image
from rrt_dist.models.rrt import RerankingTransformer
from rrt_dist.schema import NO_ID
from rrt_dist.store import MemoryFeatures, take_locals_from

STAGES = ("frozen", "finetune")
ROLES = ("anchor", "positive", "negative")


class JointReranker(nn.Module):
    def __init__(self, extractor: DenseGrid, **rrt_overrides):
        super().__init__()
        self.backbone, self.last = extractor.model, extractor.last
        self.mean, self.std = extractor.cfg.mean, extractor.cfg.std
        mean = torch.as_tensor(extractor.l_mean)
        proj = torch.as_tensor(extractor.l_proj)                              # [C, dim]
        self.project = nn.Linear(proj.shape[0], proj.shape[1])
        with torch.no_grad():                                                 # starts as the extractor's projection
            self.project.weight.copy_(proj.T)
            self.project.bias.copy_(-(mean @ proj))
        side = extractor.cfg.image_size // self.backbone.feature_info[self.last]["reduction"]
        self.register_buffer("positions", torch.from_numpy(grid_positions(side, side, extractor.cfg.image_size)))
        self.rrt = RerankingTransformer(**{"use_global": False, "position_encoding": "sine2d",
                                           "local_dim": proj.shape[1], **rrt_overrides})

    def locals(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, h*w, dim]`` L2-normalised local descriptors of normalised ``[B, 3, H, W]`` images."""
        (fmap,) = self.backbone.forward_intermediates(images, indices=[self.last], intermediates_only=True)
        return F.normalize(self.project(fmap.flatten(2).transpose(1, 2)), p=2, dim=-1)

    def forward(self, images: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Logits of the pairs ``(images[src[i]], images[tgt[i]])``; each image goes through the backbone once."""
        local = self.locals(images)
        b, n = len(src), local.shape[1]
        mask = torch.zeros(b, n, dtype=torch.bool, device=local.device)
        scales = torch.zeros(b, n, dtype=torch.long, device=local.device)
        positions = self.positions.expand(b, -1, -1)
        unused_global = local.new_zeros(b, 1)
        return self.rrt(unused_global, local[src], mask, scales, unused_global, local[tgt], mask, scales,
                        src_positions=positions, tgt_positions=positions)


def set_stage(model: JointReranker, stage: str) -> None:
    """Put the model in training mode for ``stage`` (``frozen`` or ``finetune``)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    model.train()
    model.backbone.requires_grad_(stage == "finetune")
    if stage == "frozen":
        model.backbone.eval()
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


# ----------------------------------------------------------------------------- training images

def train_crop(rgb: np.ndarray, size: int, scale: tuple[float, float], seed: int) -> np.ndarray:
    """The paper's SOP training augmentation, seeded: a random crop (``scale`` of the area, aspect 3/4..4/3)
    resized to ``size`` x ``size``, flipped left-right half of the time. uint8 ``[size, size, 3]``."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(x, scale=list(scale), ratio=[3 / 4, 4 / 3])
        flip = bool(torch.rand(()) < 0.5)
    x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
    return (TF.hflip(x) if flip else x).permute(1, 2, 0).contiguous().numpy()


def triplet_rows(uris: np.ndarray, triplets: np.ndarray, seed: int, epoch: int, rank: int) -> list[dict]:
    """Ray Data rows of one worker's epoch: the three images' URIs and the seed of their crops."""
    base = np.random.default_rng([seed, epoch, rank, 2]).integers(0, 2 ** 62, size=len(triplets))
    return [{"anchor": uris[a], "positive": uris[p], "negative": uris[n], "seed": int(s)}
            for (a, p, n), s in zip(triplets.tolist(), base.tolist())]


def decode_triplets(batch: dict, image_size: int, scale: tuple[float, float]) -> dict:
    """``map_batches`` function: URIs -> augmented uint8 images ``[B, S, S, 3]`` per role."""
    return {role: np.stack([train_crop(load_image(uri), image_size, scale, int(seed) * 3 + r)
                            for uri, seed in zip(batch[role], batch["seed"])])
            for r, role in enumerate(ROLES)}


def triplet_batch(images: dict, mean, std) -> dict[str, torch.Tensor]:
    """Model inputs for decoded triplets: the 3B images once, pairs (anchor, positive) -> 1 and
    (anchor, negative) -> 0 as index pairs into them."""
    b = len(images["anchor"])
    anchor = torch.arange(b)
    return {"images": normalised(torch.cat([torch.as_tensor(images[r]) for r in ROLES]), mean, std),
            "src": torch.cat([anchor, anchor]), "tgt": torch.cat([anchor + b, anchor + 2 * b]),
            "target": torch.cat([torch.ones(b), torch.zeros(b)])}


def joint_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE-with-logits on the reranker's logits only (the backbone learns through them)."""
    logits = model(batch["images"], batch["src"], batch["tgt"])
    return F.binary_cross_entropy_with_logits(logits, batch["target"]), logits


# ----------------------------------------------------------------------------- validation

class ReextractedValidation:
    """Validation of a joint model: the validation images' locals re-extracted by the current backbone
    every epoch, the global shortlist from the stored table (the paper retrieves with the fixed global
    model and reranks its top-100), scored by the same reranking and metrics as evaluation.

    ``val`` is a validation set (``rrt_dist.pipelines.train.validation_set``); its images are decoded
    and prepared once, with the extractor's preparation (and revisitop query crops).
    """

    def __init__(self, val: dict, preparer, batch_size: int = 32):
        from rrt_dist.store import FeatureStore

        self.val, self.batch_size = val, batch_size
        bench = val["bench"]
        self.query_ids = val["query_ids"][val["query_ids"] != NO_ID]
        self.gallery_ids = bench.gallery.column("id").to_numpy()
        images = {}
        for table in (bench.queries, bench.gallery):
            for row in table.select(["id", "uri", "bbox"]).to_pylist():
                if row["id"] not in images:
                    images[row["id"]] = decode_and_prepare(row["uri"], row["bbox"], preparer)[0].image
        self.images = images
        # The globals never change (the shortlist's model is fixed): read once, not every epoch.
        stores = [FeatureStore(*t) for t in [val["query"], *val["gallery"]]]
        self.globals = {"query": take_locals_from(stores[:1], self.query_ids)["global"],
                        "gallery": take_locals_from(stores[1:], self.gallery_ids)["global"]}

    @torch.inference_mode()
    def _features(self, model: JointReranker, ids: np.ndarray, globals_: np.ndarray) -> MemoryFeatures:
        device = model.positions.device
        parts = []
        for s in range(0, len(ids), self.batch_size):
            images = torch.as_tensor(np.stack([self.images[i] for i in ids[s:s + self.batch_size].tolist()]),
                                     device=device)
            parts.append(model.locals(normalised(images, model.mean, model.std)).cpu())
        local = torch.cat(parts).numpy()
        n, width = local.shape[:2]
        features = {"global": globals_, "local": local,
                    "positions": np.broadcast_to(model.positions.cpu().numpy(), (n, width, 2)).copy(),
                    "scales": np.zeros((n, width), np.int64), "n_local": np.full(n, width),
                    "mask": np.zeros((n, width), bool)}
        return MemoryFeatures(ids, features)

    def __call__(self, model: JointReranker, k: int) -> dict:
        from .core import validate

        was_training = {m: m.training for m in model.modules()}
        model.eval()
        val = {**self.val, "query": self._features(model, self.query_ids, self.globals["query"]),
               "gallery": [self._features(model, self.gallery_ids, self.globals["gallery"])]}
        result = validate(model.rrt, val, k)
        for module, mode in was_training.items():      # back to the stage's modes (BatchNorm stays in eval)
            module.training = mode
        return result


# ----------------------------------------------------------------------------- exported weights

def write_projection(layer: nn.Linear, path: str | Path) -> str:
    """A trained projection ``W x + b`` as the extractors' ``(x - mean) @ P`` (``.npz``): ``P = W^T`` and ``mean``
    solving ``mean @ P = -b`` (exact: ``P`` has full column rank). Returns the path."""
    weight = layer.weight.detach().cpu().double().numpy()                   # [dim, C]
    bias = layer.bias.detach().cpu().double().numpy()
    projection = weight.T
    mean = -bias @ np.linalg.pinv(projection)
    np.savez(path, mean=mean.astype(np.float32), projection=projection.astype(np.float32))
    return str(path)


def export_backbone(model: JointReranker, folder: str | Path) -> dict:
    """Write the finetuned extractor where the ``dense-grid`` extractor reads it: ``backbone.pt`` (the timm
    state dict, ``backbone.options.checkpoint``) and ``local_projection.npz`` (``backbone.options.local_projection``)."""
    folder = Path(folder)
    torch.save(model.backbone.state_dict(), folder / "backbone.pt")
    return {"checkpoint": str(folder / "backbone.pt"),
            "local_projection": write_projection(model.project, folder / "local_projection.npz")}
