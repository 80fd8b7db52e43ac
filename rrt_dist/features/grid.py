"""Single-scale extractors whose locals are the cells / tokens of one feature map.

- ``dense-grid`` (the RRT paper's SOP setting): 224×224 input, every cell of the last (stride-32)
  CNN map is a local descriptor (7×7 = 49), global = spatial average; both linearly projected
  to 128-d.
- ``vit`` (the ViT-reranking paper): DeiT-S / Swin-T from timm, CvT-13 from Hugging Face
  ``transformers`` (extra ``cvt``); global = CLS token, or the mean of the patch tokens where the
  model has none; locals = patch tokens (after the final norm) average-pooled to ``grid_size`` x
  ``grid_size`` (7: DeiT-S and CvT-13 14x14 -> 7x7, Swin-T's 7x7 as is), with their grid positions.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from rrt_dist.schema import WeightsUnavailable

from .base import (ImageFeatures, Prepared, image_tensor, l2n, load_projection, pick_device, resize_center_crop,
                   resize_exact)
from .options import DenseGridConfig, ViTConfig, parse_options
from .weights import create_backbone


def grid_positions(h: int, w: int, size: int) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(xs.ravel() + 0.5) * size / w, (ys.ravel() + 0.5) * size / h], 1).astype(np.float32)


class _SingleScale:
    """Shared batching: prepare to a square input, one forward pass per batch."""
    config_class: type

    @classmethod
    def parse_config(cls, **cfg):
        return parse_options(cls.config_class, **cfg)

    @classmethod
    def preparer(cls, **cfg):
        config = cls.parse_config(**cfg)
        if config.resize:
            return lambda rgb: resize_center_crop(rgb, config.resize, config.image_size)
        return lambda rgb: resize_exact(rgb, config.image_size)

    @property
    def config(self) -> dict:
        return {k: v for k, v in asdict(self.cfg).items() if k != "device"}

    def _batch(self, batch: list[Prepared]) -> torch.Tensor:
        return torch.cat([image_tensor(p.image, self.cfg.mean, self.cfg.std, self.device) for p in batch])


class DenseGrid(_SingleScale):
    name = "dense-grid"
    config_class = DenseGridConfig

    def __init__(self, **cfg):
        self.cfg = self.parse_config(**cfg)
        self.device = pick_device(self.cfg.device)
        self.model = create_backbone(self.cfg.model, self.cfg.checkpoint, self.cfg.pretrained).to(self.device)
        self.last = len(self.model.feature_info) - 1
        channels = self.model.feature_info[self.last]["num_chs"]
        self.g_mean, self.g_proj = load_projection(self.cfg.global_projection, channels, self.cfg.dim, self.cfg.seed)
        self.l_mean, self.l_proj = load_projection(self.cfg.local_projection, channels, self.cfg.dim, self.cfg.seed + 1)
        self.global_dim = self.local_dim = self.cfg.dim
        size = self.cfg.image_size // self.model.feature_info[self.last]["reduction"]
        self.max_local = size * size

    @torch.inference_mode()
    def extract(self, batch: list[Prepared]) -> list[ImageFeatures]:
        if not batch:
            return []
        (fmap,) = self.model.forward_intermediates(self._batch(batch), indices=[self.last], intermediates_only=True)
        fmap = fmap.float().cpu().numpy()                                    # [B, C, h, w]
        b, c, h, w = fmap.shape
        cells = fmap.reshape(b, c, h * w).transpose(0, 2, 1)                 # [B, hw, C]
        glob = l2n((fmap.mean(axis=(2, 3)) - self.g_mean) @ self.g_proj)
        local = l2n((cells - self.l_mean) @ self.l_proj)
        pos = grid_positions(h, w, self.cfg.image_size)
        return [ImageFeatures(glob[i], local[i], pos, np.zeros(h * w, np.int64)) for i in range(b)]


TIMM_VITS = {"deit-s": "deit_small_patch16_224", "swin-t": "swin_tiny_patch4_window7_224"}


def pool_grid(tokens: torch.Tensor, h: int, w: int, size: int) -> torch.Tensor:
    """Average-pool ``[B, h*w, C]`` patch tokens to ``[B, size*size, C]`` (the ViT-reranking reference's 14x14 ->
    7x7). When ``size`` does not divide the grid, upsample x4 (nearest) first, so each output cell is the
    area-weighted mean of the patches it covers."""
    x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    if h % size or w % size:
        x = torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")
    return torch.nn.functional.adaptive_avg_pool2d(x, size).flatten(2).transpose(1, 2)


class ViTTokens(_SingleScale):
    name = "vit"
    config_class = ViTConfig

    def __init__(self, **cfg):
        self.cfg = self.parse_config(**cfg)
        self.device = pick_device(self.cfg.device)
        if self.cfg.model == "cvt-13":
            self.model, dim, grid = _create_cvt13(self.cfg), 384, self.cfg.image_size // 16
            self.has_cls = True
        else:
            name = TIMM_VITS.get(self.cfg.model, self.cfg.model)
            self.model = create_backbone(name, self.cfg.checkpoint, self.cfg.pretrained)
            dim = self.model.num_features
            self.has_cls = getattr(self.model, "cls_token", None) is not None
            grid = self.cfg.image_size // self.model.feature_info[-1]["reduction"]
        self.model = self.model.to(self.device)
        self.width = dim
        self.global_dim = self.local_dim = self.cfg.dim or dim
        if self.cfg.dim:
            self.g_mean, self.g_proj = load_projection(self.cfg.global_projection, dim, self.cfg.dim, self.cfg.seed)
            self.l_mean, self.l_proj = load_projection(self.cfg.local_projection, dim, self.cfg.dim, self.cfg.seed + 1)
        self.grid = self.cfg.grid_size or grid
        self.max_local = self.grid * self.grid

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global [B, width], tokens [B, grid*grid, width])`` of normalised images, differentiable: the CLS
        token (the tokens' mean where the model has none) and the patch tokens pooled to the grid."""
        if self.cfg.model == "cvt-13":
            out = self.model(pixel_values=x)
            patches = out.last_hidden_state                                   # [B, C, h, w]
            cls = out.cls_token_value[:, 0]
            h, w = patches.shape[-2:]
            tokens = patches.flatten(2).transpose(1, 2)
        else:
            feats = self.model.forward_features(x)
            if feats.ndim == 4:                                               # Swin: [B, h, w, C]
                h, w = feats.shape[1:3]
                tokens, cls = feats.flatten(1, 2), None
            else:                                                             # ViT/DeiT: [B, prefix + hw, C]
                n_prefix = getattr(self.model, "num_prefix_tokens", 1)
                tokens, cls = feats[:, n_prefix:], feats[:, 0]
                h = w = int(round(tokens.shape[1] ** 0.5))
        glob = cls if cls is not None else tokens.mean(dim=1)
        if (h, w) != (self.grid, self.grid):
            tokens = pool_grid(tokens, h, w, self.grid)
        return glob, tokens

    @torch.inference_mode()
    def extract(self, batch: list[Prepared]) -> list[ImageFeatures]:
        if not batch:
            return []
        glob, tokens = (t.float().cpu().numpy() for t in self.tokens(self._batch(batch)))
        if self.cfg.dim:
            glob, tokens = (glob - self.g_mean) @ self.g_proj, (tokens - self.l_mean) @ self.l_proj
        glob, local = l2n(glob), l2n(tokens)
        pos = grid_positions(self.grid, self.grid, self.cfg.image_size)
        return [ImageFeatures(glob[i], local[i], pos, np.zeros(self.max_local, np.int64)) for i in range(len(batch))]


def _create_cvt13(cfg: ViTConfig):
    try:
        from transformers import CvtConfig, CvtModel
    except ImportError as err:
        raise ImportError("CvT-13 needs Hugging Face transformers: pip install 'rrt-dist[cvt]'") from err
    if cfg.checkpoint:
        return CvtModel.from_pretrained(cfg.checkpoint).eval()
    if not cfg.pretrained:
        return CvtModel(CvtConfig()).eval()   # CvtConfig's defaults are CvT-13
    try:
        return CvtModel.from_pretrained("microsoft/cvt-13").eval()
    except Exception as err:  # noqa: BLE001
        raise WeightsUnavailable("no weights for cvt-13: the Hugging Face hub is unreachable; provide "
                                 "backbone.options.checkpoint=DIR (a saved CvtModel) or backbone.options.pretrained=false") from err
