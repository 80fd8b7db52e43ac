"""Joint finetuning of a dense-grid backbone with RRT (the paper's SOP experiment, Table 6): the model
and its two stages. The Ray Data image pipeline and the Ray Train loop around it are not built yet.

``JointReranker`` computes the same locals as the ``dense-grid`` extractor (last feature map, every
cell, the extractor's projection to 128-d as a trainable linear layer, L2-normalised) but
differentiably, and scores pairs with an RRT in the SOP setting (no global tokens, 2-D sine
position embedding). Stages (``set_stage``):

* ``frozen``: the backbone is fixed (no gradients, eval mode); projection and RRT train;
* ``finetune``: the backbone trains too, with every BatchNorm kept in eval mode (running statistics
  frozen), the loss still on the reranker's logits only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rrt_dist.features.grid import DenseGrid, grid_positions
from rrt_dist.models.rrt import RerankingTransformer

STAGES = ("frozen", "finetune")


class JointReranker(nn.Module):
    def __init__(self, extractor: DenseGrid, **rrt_overrides):
        super().__init__()
        self.backbone, self.last = extractor.model, extractor.last
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
