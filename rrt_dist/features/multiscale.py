"""DELG-style multi-scale CNN descriptors (the RRT paper's DELG setting).

Per image: a pyramid over the paper's 7 scales (0.25 … 2.0; longest side capped before, default
1024). Global: GeM over the stride-32 map at the global scales, summed L2-normalised, optionally
whitened (or with SuperGlobal's regional GeM and scale-GeM, ``rrt_dist.features.options.MultiscaleConfig``). Locals: every cell of the stride-16 map at every scale, scored by feature norm (the
stand-in DELG uses before its attention head is trained; learned attention heads are not loaded
yet); projected to 128-d (a PCA from ``local_projection``, else a fixed orthogonal map); grid-cell non-maximum
suppression in original-image coordinates so one location seen at several scales keeps only
its best-scoring descriptor; top ``max_local`` (500) across scales.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import (ImageFeatures, Prepared, gem, image_tensor, l2n, load_projection, pick_device, regional_gem,
                   resize_longest, scale_gem)
from .options import DELG_SCALES, MultiscaleConfig, parse_options, recorded_options
from .weights import create_backbone


def stride_indices(model) -> tuple[int, int]:
    reductions = [f["reduction"] for f in model.feature_info]
    if 16 not in reductions or 32 not in reductions:
        raise ValueError(f"backbone needs stride-16 and stride-32 feature maps, has strides {reductions}")
    return len(reductions) - 1 - reductions[::-1].index(16), len(reductions) - 1 - reductions[::-1].index(32)


def grid_nms(positions: np.ndarray, order: np.ndarray, cell: float) -> np.ndarray:
    """Keep, in ``order``, the first descriptor of each ``cell``-sized grid cell."""
    if cell <= 0:
        return order
    keys = np.floor(positions[order] / cell).astype(np.int64)
    _, first = np.unique(keys[:, 0] * 1_000_003 + keys[:, 1], return_index=True)
    return order[np.sort(first)]


class MultiscaleCNN:
    name = "multiscale-cnn"
    config_class = MultiscaleConfig

    @staticmethod
    def parse_config(**cfg) -> MultiscaleConfig:
        return parse_options(MultiscaleConfig, **cfg)

    @classmethod
    def preparer(cls, **cfg):
        max_size = cls.parse_config(**cfg).max_size
        return lambda rgb: resize_longest(rgb, max_size)

    def __init__(self, **cfg):
        self.cfg = self.parse_config(**cfg)
        missing = [s for s in self.cfg.global_scales if s not in self.cfg.scales]
        if missing:
            raise ValueError(f"global_scales {missing} are not among scales {self.cfg.scales}")
        if self.cfg.regional_gem_window % 2 == 0:
            raise ValueError(f"regional_gem_window={self.cfg.regional_gem_window}: an odd window (centred on its cell)")
        self.device = pick_device(self.cfg.device)
        self.model = create_backbone(self.cfg.model, self.cfg.checkpoint, self.cfg.pretrained).to(self.device)
        self.i16, self.i32 = stride_indices(self.model)
        c16, c32 = self.model.feature_info[self.i16]["num_chs"], self.model.feature_info[self.i32]["num_chs"]
        self.local_mean, self.local_proj = load_projection(self.cfg.local_projection, c16, self.cfg.local_dim,
                                                           self.cfg.seed)
        if self.cfg.whitening:
            data = np.load(self.cfg.whitening)
            self.white_mean, self.white_proj = data["mean"].astype(np.float32), data["projection"].astype(np.float32)
        else:
            self.white_mean, self.white_proj = None, None
        self.global_dim = c32 if self.white_proj is None else self.white_proj.shape[1]
        # Scale indices always refer to the 7 DELG scales (what RRT's scale embedding is indexed by),
        # whichever subset the pyramid uses.
        self.scale_index = [int(np.abs(np.log(s) - np.log(DELG_SCALES)).argmin()) for s in self.cfg.scales]
        self.local_dim, self.max_local = self.cfg.local_dim, self.cfg.max_local

    @property
    def config(self) -> dict:
        return recorded_options(self.cfg)

    @torch.inference_mode()
    def _same_size(self, batch: list[Prepared]) -> list[ImageFeatures]:
        """Images of one size: one forward pass per scale for all of them."""
        x = torch.cat([image_tensor(p.image, self.cfg.mean, self.cfg.std, self.device) for p in batch])
        h, w = x.shape[-2:]
        per_scale, descs, scores, positions, scale_ids = [], [], [], [], []
        for si, s in enumerate(self.cfg.scales):
            size = (max(16, round(h * s)), max(16, round(w * s)))
            xs = x if s == 1.0 else F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
            f16, f32 = self.model.forward_intermediates(xs, indices=[self.i16, self.i32], intermediates_only=True)
            if s in self.cfg.global_scales:
                if self.cfg.regional_gem_p:
                    f32 = regional_gem(f32, self.cfg.regional_gem_p, self.cfg.regional_gem_window)
                per_scale.append(F.normalize(gem(f32, self.cfg.gem_p), dim=-1))
            f = f16.flatten(2).transpose(1, 2)                        # [B, h16 * w16, C16]
            gh, gw = f16.shape[-2:]
            ys, xs_ = torch.meshgrid(torch.arange(gh, device=f.device), torch.arange(gw, device=f.device), indexing="ij")
            # receptive-field centres in prepared-image pixels
            pos = torch.stack([(xs_.flatten() + 0.5) * (size[1] / gw), (ys.flatten() + 0.5) * (size[0] / gh)], 1) / s
            descs.append(f)
            scores.append(f.norm(dim=2))
            positions.append(pos)
            scale_ids.append(torch.full((f.shape[1],), self.scale_index[si], device=f.device))
        g = F.normalize(scale_gem(per_scale, self.cfg.scale_gem_p), dim=-1).float().cpu().numpy()
        if self.white_proj is not None:
            g = l2n((g - self.white_mean) @ self.white_proj)
        desc = torch.cat(descs, 1).float().cpu().numpy()
        score = torch.cat(scores, 1).float().cpu().numpy()
        pos = torch.cat(positions).float().cpu().numpy()
        scl = torch.cat(scale_ids).cpu().numpy()
        out = []
        for i, prepared in enumerate(batch):
            order = np.argsort(-score[i], kind="stable")
            order = grid_nms(pos * np.asarray(prepared.factor, np.float32), order, self.cfg.nms_cell)[: self.max_local]
            local = l2n((l2n(desc[i, order]) - self.local_mean) @ self.local_proj)
            out.append(ImageFeatures(g[i].astype(np.float32), local.astype(np.float32), pos[order],
                                     scl[order].astype(np.int64)))
        return out

    def extract(self, batch: list[Prepared]) -> list[ImageFeatures]:
        """Images of one size go through the network together (one forward pass per scale); a batch of several sizes,
        size by size. Bucketed rather than padded: zero padding at the bottom / right is not the network's own
        border (its padded cells leak into the image's last cells through every layer), so padding would change the
        descriptors of images that could have shared a batch, and a gallery's photos mostly share a few sizes."""
        out: list[ImageFeatures | None] = [None] * len(batch)
        sizes: dict[tuple, list[int]] = {}
        for i, prepared in enumerate(batch):
            sizes.setdefault(prepared.image.shape[:2], []).append(i)
        for same in sizes.values():
            for i, features in zip(same, self._same_size([batch[i] for i in same])):
                out[i] = features
        return out
