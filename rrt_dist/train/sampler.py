"""Training pairs as the RRT paper samples them, from each training image's global top-k.

Rows are indices into the training table. ``neighbours[i]`` is image i's global top-k (itself
excluded, -1 padding). An image is an anchor when at least ``min_positives`` of its top-k share
its label and at least one does not (there must be a negative to draw). Per anchor and epoch:

* positive: a random same-label image from its top-k (``positive_scope="topk"``, the GLDv2 setting)
  or from all images of its label (``"label"``, the SOP setting);
* negative: a random different-label image from its top-k.

The loss treats (anchor, positive) as 1 and (anchor, negative) as 0.
"""
from __future__ import annotations

import numpy as np

POSITIVE_SCOPES = ("topk", "label")


def training_neighbours(search, query_blocks, ids: np.ndarray, k: int) -> np.ndarray:
    """Each training image's top-``k`` rows by global similarity, itself excluded (``[N, k]`` int32, -1 padding).

    ``search(queries, k) -> (scores, ids)`` searches the training table (exact or a sharded index);
    ``query_blocks`` yields ``(ids, vectors)`` blocks of the training rows, in any order: the table streamed
    through search, never held (GLDv2's 1.5M × 2048-d globals are 12 GB as float32). Rows are int32, half
    of int64's [N, k] (1.5M × 100: 600 MB).
    """
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def rows_of(found: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(sorted_ids, found), 0, len(ids) - 1)
        return np.where(sorted_ids[pos] == found, order[pos], -1)

    out = np.full((len(ids), k), -1, dtype=np.int32)
    for block_ids, vectors in query_blocks:
        _, found = search(vectors, min(k + 1, len(ids)))
        rows = rows_of(np.asarray(found, np.int64))
        own = rows_of(np.asarray(block_ids, np.int64))
        if (own == -1).any():
            raise ValueError("the query blocks hold ids that are not training rows")
        rows[rows == own[:, None]] = -1                      # self
        kept = rows != -1
        place = np.cumsum(kept, axis=1) - 1                  # each kept row's place among its query's kept rows
        r, c = np.nonzero(kept & (place < k))
        out[own[r], place[r, c]] = rows[r, c]
    return out


def eligible_anchors(neighbours: np.ndarray, labels: np.ndarray, min_positives: int) -> np.ndarray:
    """Rows with >= ``min_positives`` same-label and >= 1 different-label images among their neighbours.
    ``min_positives=0`` (positives drawn from the whole label, as self-supervised views): the label needs
    another image anywhere."""
    labels = np.asarray(labels)
    valid = neighbours != -1
    same = (labels[np.where(valid, neighbours, 0)] == labels[:, None]) & valid
    n_same = same.sum(axis=1)
    n_other = valid.sum(axis=1) - n_same
    keep = (n_same >= min_positives) & (n_other >= 1)
    if min_positives == 0:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        keep &= counts[inverse] >= 2
    return np.flatnonzero(keep)


def anchor_shard(anchors: np.ndarray, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This worker's anchors for ``epoch``: a seeded permutation dealt round-robin, disjoint across ranks.

    Every rank gets the same count (the remainder is dropped) so DDP workers take the same number of steps.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(anchors)
    per_rank = len(perm) // world_size
    return perm[rank::world_size][:per_rank]


def sample_triplets(anchors: np.ndarray, neighbours: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                    positive_scope: str = "topk") -> np.ndarray:
    """``[n, 3]`` rows (anchor, positive, negative), one triplet per anchor, following the rules above."""
    if positive_scope not in POSITIVE_SCOPES:
        raise ValueError(f"positive_scope must be one of {POSITIVE_SCOPES}, got {positive_scope!r}")
    labels = np.asarray(labels)
    by_label: dict = {}
    if positive_scope == "label":
        for row, lab in enumerate(labels):
            by_label.setdefault(lab, []).append(row)
    out = np.empty((len(anchors), 3), dtype=np.int64)
    for n, a in enumerate(anchors):
        nn = neighbours[a][neighbours[a] != -1]
        same = labels[nn] == labels[a]
        if positive_scope == "topk":
            positives = nn[same]
        else:
            positives = np.asarray([r for r in by_label[labels[a]] if r != a])
        out[n] = (a, rng.choice(positives), rng.choice(nn[~same]))
    return out
