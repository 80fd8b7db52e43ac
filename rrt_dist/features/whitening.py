"""Learned linear reductions for descriptors: PCA (optionally whitened), saved as ``.npz``.

The files are what ``multiscale-cnn`` takes as ``whitening`` (global) and ``local_projection``
(locals), and ``dense-grid`` as ``global_projection`` / ``local_projection``: arrays ``mean [C]``
and ``projection [C, d]``, applied as ``l2n((x - mean) @ projection)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def fit_pca(x: np.ndarray, out_dim: int, whiten: bool = True, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [C], projection [C, out_dim])`` from descriptors ``x [N, C]`` (N >= out_dim)."""
    x = np.asarray(x, np.float64)
    if x.shape[0] < out_dim or x.shape[1] < out_dim:
        raise ValueError(f"PCA to {out_dim} dims needs at least {out_dim} samples and dims, got {x.shape}")
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    values, vectors = np.linalg.eigh(cov)
    top = np.argsort(values)[::-1][:out_dim]
    projection = vectors[:, top]
    if whiten:
        projection = projection / np.sqrt(values[top] + eps)
    return mean.astype(np.float32), projection.astype(np.float32)


def save_projection(path: str | Path, mean: np.ndarray, projection: np.ndarray) -> Path:
    path = Path(path)
    np.savez(path, mean=mean, projection=projection)
    return path if path.suffix == ".npz" else path.with_suffix(path.suffix + ".npz")
