"""A deliberately simple global descriptor: colour histogram + downsampled grey pixels.

It is the foundation's baseline (no learned weights) and a sanity reference for learned
extractors: anything learned should beat it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class TinyImageConfig:
    hist_bins: tuple[int, int, int] = (8, 4, 4)   # hue, saturation, value
    thumb: tuple[int, int] = (12, 9)              # grey thumbnail (width, height)
    thumb_weight: float = 1.0


class TinyImageExtractor:
    name = "tiny-image"

    def __init__(self, **cfg):
        self.cfg = TinyImageConfig(**cfg)
        self.dim = int(np.prod(self.cfg.hist_bins)) + self.cfg.thumb[0] * self.cfg.thumb[1]

    @property
    def config(self) -> dict:
        return asdict(self.cfg)

    def describe(self, rgb: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, list(self.cfg.hist_bins), [0, 180, 0, 256, 0, 256]).ravel()
        hist = np.sqrt(hist / max(hist.sum(), 1.0))           # Hellinger
        grey = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), self.cfg.thumb, interpolation=cv2.INTER_AREA)
        thumb = grey.astype(np.float32).ravel()
        thumb = (thumb - thumb.mean()) / (np.linalg.norm(thumb - thumb.mean()) + 1e-6)
        vec = np.concatenate([hist, self.cfg.thumb_weight * thumb]).astype(np.float32)
        return vec / (np.linalg.norm(vec) + 1e-12)

    def __call__(self, images: list[np.ndarray]) -> dict:
        """Batch interface shared by all extractors: ``{"global": [B, d] float32, L2-normalised}``."""
        return {"global": np.stack([self.describe(im) for im in images]) if images else np.zeros((0, self.dim),
                                                                                                 np.float32)}
