"""Each reranker's options (``reranker.<name>``): plain dataclasses, so the registry and the config schema read
them without importing torch, OpenCV or the scorers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rrt_dist.schema import bounded, choice

WEIGHTINGS = ("correlation", "inverse", "minus", "uniform")
CENTERS = ("cls", "mean")


@dataclass
class GVConfig:
    max_distance: float = bounded(0.9, gt=0)        # descriptor L2 distance for a putative match (unit vectors)
    ransac_threshold: float = bounded(20.0, gt=0)   # reprojection error in pixels (DELG's residual threshold)
    max_trials: int = bounded(1000, ge=1)
    confidence: float = bounded(0.99, gt=0, lt=1)
    min_inliers: int = bounded(0, ge=0)             # below this a pair scores 0 (unverified)
    seed: int = 0
    top_locals: Optional[int] = bounded(None, ge=1)  # an image's best locals matched (None: all stored)


@dataclass
class RRTOptions:
    """``reranker.rrt`` (the weights are ``reranker.checkpoint``)."""
    # Locals per image fed to the model, best first; None: as many as it was trained with (the RRT paper's
    # Table 8 varies this; fewer locals also cut the [K, 2L, 2L] attention on large top-K).
    top_locals: Optional[int] = bounded(None, ge=1)
    # Final order by RRT logit + global_weight × global cosine; 0: the paper's RRT (the global score only breaks
    # ties). None: the weight the checkpoint records: its validation's choice if trained with train.global_fusion
    # (a folder gallery's self-supervised recipe is), else 0 (released weights, labelled recipes).
    global_weight: Optional[float] = bounded(None, ge=0)


@dataclass
class StructuralConfig:
    """Options of the structural reranker (``reranker.structural``); defaults as DIML / the reference code."""
    # correlation (CNNs) | inverse (transformers with a CLS token) | minus | uniform
    weighting: str = choice("correlation", *WEIGHTINGS)
    temperature: float = bounded(0.1, gt=0)       # of the inverse weighting
    ot_temp: float = bounded(0.05, gt=0)          # of the transport kernel
    center: str = choice("cls", "cls", "mean")    # cls: the stored global descriptor | mean: the patches' normalised mean
    max_iter: int = bounded(100, ge=1)
    stop_tol: float = bounded(0.1, ge=0)
    ot_part: float = bounded(1.0, gt=0, le=1)     # < 1: partial transport


@dataclass
class SuperGlobalOptions:
    """``reranker.superglobal``: the paper's defaults (M = 400, K = 9, β = 0.15). The top-M reranked is at most
    what the reranker is handed: ``min(m, reranker.depth)`` (the report's row names it)."""
    m: int = bounded(400, ge=1)            # the top-M refined and reordered
    k: int = bounded(9, ge=1)              # neighbours of each candidate, and refined vectors max-pooled into e
    beta: float = bounded(0.15, ge=0)      # weight of a neighbour: beta × its similarity (itself: 1)
