"""Geometric verification, DELG-style: the RRT paper's main baseline.

Putative matches are mutual nearest neighbours of the L2-normalised local descriptors within a
descriptor-distance threshold; a RANSAC affine model (OpenCV ``estimateAffine2D``) over their
positions gives the inlier count, the pair's score. Candidates are then ordered by
(inliers, global score), best first, as DELG does (``rrt_dist.rerank.core.rerank_top_k``); only the top-K
are reranked.
"""
from __future__ import annotations

import cv2
import numpy as np

from rrt_dist.rerank.options import GVConfig


def mutual_matches(a: np.ndarray, b: np.ndarray, max_distance: float) -> np.ndarray:
    """Index pairs ``[M, 2]`` of mutual nearest neighbours between descriptor sets within ``max_distance``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64)
    sim = a @ b.T
    ab, ba = sim.argmax(axis=1), sim.argmax(axis=0)
    rows = np.arange(len(a))
    mutual = ba[ab] == rows
    close = np.sqrt(np.maximum(2.0 - 2.0 * sim[rows, ab], 0.0)) <= max_distance
    keep = mutual & close
    return np.stack([rows[keep], ab[keep]], axis=1)


def inliers(points_a: np.ndarray, points_b: np.ndarray, cfg: GVConfig) -> np.ndarray:
    """Which point pairs are inliers of the best RANSAC affine transform mapping ``points_a`` onto ``points_b``:
    none when fewer than ``cfg.min_inliers`` are (the pair does not verify)."""
    keep = np.zeros(len(points_a), bool)
    if len(points_a) < 3:
        return keep
    cv2.setRNGSeed(cfg.seed)
    _, found = cv2.estimateAffine2D(points_a.astype(np.float32), points_b.astype(np.float32), method=cv2.RANSAC,
                                    ransacReprojThreshold=cfg.ransac_threshold, maxIters=cfg.max_trials,
                                    confidence=cfg.confidence, refineIters=0)
    if found is not None and int(found.sum()) >= cfg.min_inliers:
        keep = found.ravel().astype(bool)
    return keep


def inlier_matches(query_local: np.ndarray, query_pos: np.ndarray, local: np.ndarray, pos: np.ndarray,
                   cfg: GVConfig = GVConfig()) -> np.ndarray:
    """The verified matches of one pair: index pairs ``[n_inliers, 2]`` (query local, candidate local)."""
    pairs = mutual_matches(query_local, local, cfg.max_distance)
    return pairs[inliers(query_pos[pairs[:, 0]], pos[pairs[:, 1]], cfg)]


def gv_scores(query_local: np.ndarray, query_pos: np.ndarray, cand_local: np.ndarray, cand_pos: np.ndarray,
              cand_n: np.ndarray, cfg: GVConfig = GVConfig()) -> np.ndarray:
    """Inlier counts of one query (``[n_q, d]``, ``[n_q, 2]``) against K candidates (padded ``[K, L, d]``)."""
    return np.asarray([len(inlier_matches(query_local, query_pos, local[:n], pos[:n], cfg))
                       for local, pos, n in zip(cand_local, cand_pos, cand_n)], np.int64)
