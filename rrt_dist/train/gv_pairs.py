"""Training pairs taught by geometric verification (GV) on a gallery's own images, without labels.

Every gallery image (anchor) is paired with its global top-``neighbours`` and with ``random`` random gallery images;
GV counts each pair's inliers. A pair with at least ``threshold`` inliers is a positive, any other a negative: the
high-scoring pairs GV rejects (hard negatives) and the random pairs it rejects (easy ones). A random pair GV accepts
(another view of the anchor's place drawn by chance) is a positive like any other. The threshold is chosen on a
held-out part of the anchors (:func:`otsu_threshold`: the valley between GV's "no geometry" counts and its verified
ones), and the same held-out anchors validate the trained RRT.

Rows are indices into the training rows (``ids``); pair lists are CSR arrays (``offsets [n + 1]``, ``values``), so
a million anchors with 60 pairs each hold 60M int32 values, never a gallery x gallery matrix. An epoch visits every
positive pair once as a triplet (anchor, positive, a random negative of the anchor), which the loss scores as 1 and
0 (as the RRT paper's pairs are).
"""
from __future__ import annotations

import numpy as np

from .sampler import anchor_shard


def random_partners(anchor_ids: np.ndarray, gallery_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``[len(anchor_ids), n]`` gallery ids drawn uniformly without replacement for each anchor, never the anchor
    itself (-1 padding when the gallery is smaller); seeded per anchor id, so a block of anchors draws the same
    partners whichever block it is mined in."""
    gallery_ids = np.asarray(gallery_ids, np.int64)
    out = np.full((len(anchor_ids), n), -1, np.int64)
    for row, anchor in enumerate(np.asarray(anchor_ids, np.int64)):
        rng = np.random.default_rng([seed, int(anchor) % (1 << 64)])
        drawn = gallery_ids[rng.choice(len(gallery_ids), min(n + 1, len(gallery_ids)), replace=False)]
        drawn = drawn[drawn != anchor][:n]
        out[row, :len(drawn)] = drawn
    return out


def otsu_threshold(inliers: np.ndarray) -> int:
    """The inlier count that best splits ``inliers`` into two classes (Otsu's criterion, the largest between-class
    variance, on log(1 + inliers): GV's counts of unrelated pairs cluster near zero, verified ones spread over
    decades). Returns the smallest count of the upper class: pairs with at least that many inliers are positives.
    With one distinct value there is no valley: everything is one class and the threshold lies above it."""
    values = np.log1p(np.asarray(inliers, np.float64))
    levels, counts = np.unique(values, return_counts=True)
    if len(levels) < 2:
        return int(np.expm1(levels[-1]).round()) + 1 if len(levels) else 1
    weight = np.cumsum(counts)[:-1] / counts.sum()               # share of the lower class, cut after each level
    mean_low = np.cumsum(counts * levels)[:-1] / np.cumsum(counts)[:-1]
    mean_high = (np.cumsum((counts * levels)[::-1])[::-1][1:]) / np.cumsum(counts[::-1])[::-1][1:]
    between = weight * (1 - weight) * (mean_high - mean_low) ** 2
    cut = int(np.argmax(between))                                  # first of equally good cuts
    return int(np.expm1(levels[cut + 1]).round())


def holdout_rows(n: int, fraction: float, max_rows: int, seed: int) -> np.ndarray:
    """Boolean mask of the rows held out (seeded): ``fraction`` of them, at most ``max_rows``, at least one."""
    size = min(max_rows, max(1, round(fraction * n)))
    held = np.zeros(n, bool)
    held[np.random.default_rng([seed, 7]).choice(n, size=size, replace=False)] = True
    return held


def csr(rows: np.ndarray, values: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, values)``: ``values`` grouped by ``rows`` (each row's in their given order)."""
    order = np.argsort(rows, kind="stable")
    offsets = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=offsets[1:])
    return offsets, np.asarray(values)[order].astype(np.int32)


def pair_rows(anchors: np.ndarray, candidates: np.ndarray, inliers: np.ndarray, threshold: int, n_rows: int) -> dict:
    """The training pairs of mined (anchor row, candidate row, inliers) triples, rows in ``0..n_rows-1`` (a row of -1
    is left out: an image outside the training rows): CSR lists of ``positives`` (>= ``threshold`` inliers) and
    ``negatives`` per row, the ``anchors`` that have both, and the ``units`` of an epoch: the positive pairs of
    those anchors (indices into ``positives``)."""
    keep = (anchors >= 0) & (candidates >= 0) & (anchors != candidates)
    anchors, candidates, accepted = anchors[keep], candidates[keep], inliers[keep] >= threshold
    out = {}
    for name, chosen in (("positives", accepted), ("negatives", ~accepted)):
        out[f"{name}_offsets"], out[name] = csr(anchors[chosen], candidates[chosen], n_rows)
    has = [np.diff(out[f"{name}_offsets"]) > 0 for name in ("positives", "negatives")]
    out["anchors"] = np.flatnonzero(has[0] & has[1])
    owner = np.repeat(np.arange(n_rows), np.diff(out["positives_offsets"]))
    out["units"] = np.flatnonzero(np.isin(owner, out["anchors"]))
    return out


def pair_triplets(units: np.ndarray, pairs: dict, rng: np.random.Generator) -> np.ndarray:
    """``[n, 3]`` rows (anchor, positive, negative): per unit (a positive pair) its anchor, its positive and one of
    the anchor's negatives, uniformly."""
    offsets = pairs["positives_offsets"]
    anchors = np.searchsorted(offsets, units, side="right") - 1
    start, end = pairs["negatives_offsets"][anchors], pairs["negatives_offsets"][anchors + 1]
    negatives = pairs["negatives"][start + (rng.random(len(units)) * (end - start)).astype(np.int64)]
    return np.stack([anchors, pairs["positives"][units], negatives], axis=1).astype(np.int64)


def epoch_pair_triplets(pairs: dict, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This worker's triplets for ``epoch``: an epoch is every positive pair once (a small gallery's few anchors
    have many pairs each), with a fresh negative; each worker takes its disjoint shard of them (as labelled
    anchors are sharded), drawn with a generator seeded by (seed, epoch, rank), so a resumed run draws what the
    original would have."""
    shard = anchor_shard(pairs["units"], epoch, seed, rank, world_size)
    return pair_triplets(shard, pairs, np.random.default_rng([seed, epoch, rank, 1]))
