"""What every extractor returns, and the pieces they share.

An extractor splits its work in two: ``prepare`` (CPU: resize the decoded RGB image to what the
model reads; runs in Ray Data tasks) and ``extract`` (the model; runs in the actor pool). Local
positions come back in prepared-image pixels and :func:`to_original` maps them to the original
image (undoing the resize and, for queries, the bbox crop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ImageFeatures:
    global_: np.ndarray      # [d_g] float32, L2-normalised
    local: np.ndarray        # [n, d_l] float32, L2-normalised, best first
    positions: np.ndarray    # [n, 2] float32 (x, y) pixels
    scales: np.ndarray       # [n] int scale index

    @property
    def n_local(self) -> int:
        return len(self.local)


@dataclass
class Prepared:
    image: np.ndarray        # uint8 [H, W, 3] RGB, what the model reads
    factor: tuple            # (sx, sy): original pixels per prepared pixel
    offset: tuple            # (x, y) of the crop in the original image


def resize_longest(rgb: np.ndarray, max_size: int) -> Prepared:
    """Downscale so the longest side is at most ``max_size`` (never upscale)."""
    h, w = rgb.shape[:2]
    s = min(1.0, max_size / max(h, w))
    if s < 1.0:
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    return Prepared(rgb, (w / rgb.shape[1], h / rgb.shape[0]), (0.0, 0.0))


def resize_exact(rgb: np.ndarray, size: int) -> Prepared:
    h, w = rgb.shape[:2]
    out = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if min(h, w) > size else cv2.INTER_CUBIC)
    return Prepared(out, (w / size, h / size), (0.0, 0.0))


def resize_center_crop(rgb: np.ndarray, resize: int, size: int) -> Prepared:
    """Shorter side scaled to ``resize``, then the central ``size`` x ``size`` (torchvision's Resize(resize) +
    CenterCrop(size), the metric-learning test transform 256 -> 224)."""
    h, w = rgb.shape[:2]
    s = resize / min(h, w)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    scaled = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return Prepared(np.ascontiguousarray(scaled[top:top + size, left:left + size]), (w / nw, h / nh),
                    (left * w / nw, top * h / nh))


def to_original(features: ImageFeatures, prepared: Prepared, offset=(0.0, 0.0)) -> ImageFeatures:
    """Positions in the prepared image -> the original's pixels (``offset``: where a query's crop starts)."""
    pos = (features.positions * np.asarray(prepared.factor, np.float32) + np.asarray(prepared.offset, np.float32)
           + np.asarray(offset, np.float32))
    return ImageFeatures(features.global_, features.local, pos.astype(np.float32), features.scales)


def orthogonal_projection(in_dim: int, out_dim: int, seed: int = 0) -> np.ndarray:
    """A fixed ``[in_dim, out_dim]`` matrix with orthonormal columns (or rows), from a seed.

    Used in place of a learned reduction when none is given: for ``out_dim >= in_dim`` it is an
    isometry (inner products are kept exactly); otherwise a random orthogonal subspace.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(max(in_dim, out_dim), min(in_dim, out_dim))))
    return (q if out_dim <= in_dim else q.T).astype(np.float32)


def load_projection(path: str | None, in_dim: int, out_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [in], matrix [in, out])`` from an ``.npz`` (keys ``mean``, ``projection``) or a fixed orthogonal one."""
    if path is None:
        return np.zeros(in_dim, np.float32), orthogonal_projection(in_dim, out_dim, seed)
    data = np.load(path)
    mean, proj = data["mean"].astype(np.float32), data["projection"].astype(np.float32)
    if mean.shape != (in_dim,) or proj.shape != (in_dim, out_dim):
        raise ValueError(f"{path}: expected mean [{in_dim}] and projection [{in_dim}, {out_dim}], "
                         f"got {mean.shape} and {proj.shape}")
    return mean, proj


def l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def gem(features: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling over the spatial dims of ``[B, C, H, W]``."""
    return features.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def regional_gem(features: torch.Tensor, p: float, window: int, eps: float = 1e-6) -> torch.Tensor:
    """SuperGlobal's regional GeM input (Shao et al., ICCV 2023): the map ``[B, C, H, W]`` averaged with its power
    mean of order ``p`` over each ``window × window`` neighbourhood (LP-pooling normalised by the window's area,
    stride 1, reflection-padded; replicated where the map is too small to reflect). Clamped at ``eps`` as GeM
    clamps its input."""
    x = features.clamp(min=eps)
    pad = window // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    region = F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode=mode).pow(p), window, stride=1).pow(1.0 / p)
    return (region + x) / 2


def scale_gem(vectors: list[torch.Tensor], p: float | None) -> torch.Tensor:
    """One image's descriptors ``[B, C]`` at several scales aggregated (each L2-normalised): summed (``p`` None:
    DELG's), their element-wise max (``p`` inf), or SuperGlobal's scale-GeM of order ``p``: their generalised mean
    shifted by the minimum value γ of each image's descriptors, ``(mean (x - γ)^p)^(1/p) + γ``."""
    if p is None:
        total = vectors[0]
        for v in vectors[1:]:
            total = total + v
        return total
    x = torch.stack(vectors)                                             # [S, B, C]
    if math.isinf(p):
        return x.max(0).values
    shift = x.amin(dim=(0, 2), keepdim=True)
    return (x - shift).pow(p).mean(0).pow(1.0 / p) + shift[0]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` RGB -> float ``[B, 3, H, W]``, scaled to [0, 1] and normalised by ``mean`` / ``std``."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean, device=x.device)[:, None, None]) / torch.tensor(std, device=x.device)[:, None, None]


def image_tensor(image: np.ndarray, mean, std, device) -> torch.Tensor:
    return normalised(torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device)[None], mean, std)
