"""A deliberately simple global descriptor: colour histogram + downsampled grey pixels.

It is the foundation's baseline (no learned weights) and a sanity reference for learned
extractors: anything learned should beat it.
"""
from __future__ import annotations

from dataclasses import asdict

import cv2
import numpy as np

from .base import ImageFeatures, Prepared, resize_longest
from .options import TinyImageConfig, parse_options


class TinyImageExtractor:
    name = "tiny-image"
    config_class = TinyImageConfig

    local_dim = max_local = 0  # global only

    @staticmethod
    def parse_config(**cfg) -> TinyImageConfig:
        return parse_options(TinyImageConfig, **cfg)

    @classmethod
    def preparer(cls, **cfg):
        cls.parse_config(**cfg)
        return lambda rgb: resize_longest(rgb, 1024)

    def __init__(self, **cfg):
        self.cfg = self.parse_config(**cfg)
        self.global_dim = int(np.prod(self.cfg.hist_bins)) + self.cfg.thumb[0] * self.cfg.thumb[1]

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

    def extract(self, batch: list[Prepared]) -> list[ImageFeatures]:
        empty = np.zeros((0, 0), np.float32)
        return [ImageFeatures(self.describe(p.image), empty, np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
                for p in batch]
