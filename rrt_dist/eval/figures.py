"""Figures of a report: qualitative results as in the papers' figures (each query, its top-5 before and
after reranking, green borders for positives, red for negatives, grey for junk) and training curves."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rrt_dist.datasets import Benchmark  # noqa: E402
from rrt_dist.features.images import ImageError, load_image  # noqa: E402

COLOURS = {"positive": "#1a9641", "negative": "#d7191c", "junk": "#999999"}


def _status(bench: Benchmark, q: int, gallery_index: int) -> str:
    if bench.protocol.name != "revisitop":
        positives = getattr(bench.protocol, "positives", None)
        return "positive" if positives is not None and gallery_index in set(positives[q]) else "negative"
    g = bench.protocol.gnd[q]
    if gallery_index in set(g["easy"]) | set(g["hard"]):
        return "positive"
    return "junk" if gallery_index in set(g["junk"]) else "negative"


def _show(ax, uri, bbox, colour, title=""):
    try:
        ax.imshow(load_image(uri, bbox))
    except ImageError:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(4)
    if title:
        ax.set_title(title, fontsize=8)


def _without_self(bench: Benchmark, rows: np.ndarray) -> np.ndarray:
    """Leave-one-out benchmarks: each query's own id removed from its ranking, as the metrics do."""
    if not bench.exclude_self:
        return rows
    own = bench.queries.column("id").to_numpy()
    out = np.full_like(rows, -1)
    for q, row in enumerate(rows):
        kept = row[row != own[q]]
        out[q, :len(kept)] = kept
    return out


def qualitative_figure(bench: Benchmark, before: np.ndarray, after: np.ndarray, path: str | Path,
                       labels=("global", "reranked"), n_queries: int = 4, top: int = 5) -> Path:
    """Draw the ``n_queries`` queries whose top-``top`` changed most with reranking: the largest gains in
    positives first, then the largest losses, then any reordering; queries whose top-``top`` did not change
    are never shown while others did."""
    uris = bench.gallery.column("uri").to_pylist()
    q_uris = bench.queries.column("uri").to_pylist()
    q_boxes = bench.queries.column("bbox").to_pylist()
    before, after = _without_self(bench, before), _without_self(bench, after)

    def hits(rows, q):
        idx = bench.gallery_indices(rows[q, :top])
        return sum(_status(bench, q, int(i)) == "positive" for i in idx if i >= 0)

    gain = np.asarray([hits(after, q) - hits(before, q) for q in range(len(before))])
    moved = np.asarray([int(np.sum(before[q, :top] != after[q, :top])) for q in range(len(before))])
    order = np.lexsort((-moved, -np.abs(gain), -(gain > 0).astype(int)))
    changed = [int(q) for q in order if gain[q] != 0 or moved[q] > 0]
    chosen = (changed or [int(q) for q in order])[:n_queries]
    fig, axes = plt.subplots(2 * len(chosen), top + 1, figsize=(2 * (top + 1), 3.6 * len(chosen)), squeeze=False)
    for r, q in enumerate(chosen):
        for half, (rows, label) in enumerate(((before, labels[0]), (after, labels[1]))):
            ax_row = axes[2 * r + half]
            if half == 0:
                _show(ax_row[0], q_uris[q], q_boxes[q], "#000000", f"query {q}")
            else:
                ax_row[0].axis("off")
            ax_row[0].text(-0.1, 0.5, label, transform=ax_row[0].transAxes, rotation=90, ha="right", va="center")
            for c, gi in enumerate(bench.gallery_indices(rows[q, :top])):
                if gi < 0:
                    ax_row[c + 1].axis("off")
                    continue
                _show(ax_row[c + 1], uris[gi], None, COLOURS[_status(bench, q, int(gi))], f"#{c + 1}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def training_curve(history: list[dict], path: str | Path, loss: str = "loss (BCE)", accuracy: str = "pair accuracy",
                   score: str = "validation mAP (held-out split)") -> Path:
    """Training loss and accuracy, and the validation score, per epoch (``loss`` / ``accuracy`` / ``score``:
    what the three are called)."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [h["loss"] for h in history], "o-", label=loss)
    left.plot(epochs, [h["accuracy"] for h in history], "s-", label=accuracy)
    left.set_xlabel("epoch")
    left.set_title("training")
    left.legend()
    if any("val_score" in h for h in history):
        right.plot([h["epoch"] for h in history if "val_score" in h],
                   [100 * h["val_score"] for h in history if "val_score" in h], "o-", color="#1a9641")
    right.set_xlabel("epoch")
    right.set_title(score)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _heat(ax, rgb, values, positions, title):
    """``values`` of a patch grid (cells at ``positions`` in image pixels) drawn over the image."""
    import cv2

    side = int(round(np.sqrt(len(values))))
    grid = np.asarray(values, np.float32).reshape(side, side)
    heat = cv2.resize(grid, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    ax.imshow(rgb)
    ax.imshow(heat, cmap="jet", alpha=0.45)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def structural_figure(pairs: list[dict], path: str | Path, temperature: float = 0.1, top: int = 3) -> Path:
    """The ViT-reranking paper's Figures 1-4 for query / candidate pairs, one row each: the query's centre-to-patch
    similarity (cross-correlation) and its inverse ``exp(-x / temperature)``, the patch-to-patch similarity of
    the query patch the transport moves most mass from (boxed), the candidate's cross-correlation with the
    query's centre (the transport's candidate-side weights) and the ``top`` strongest matches of the plan.

    Each pair holds ``query_image`` / ``cand_image`` (RGB), ``query_patches`` / ``cand_patches`` ``[R, C]``,
    ``query_center``, ``query_positions`` / ``cand_positions`` ``[R, 2]`` (image pixels), ``plan`` ``[R_c, R_q]``,
    ``status`` (positive / negative / junk) and ``title``.
    """
    def l2n(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    fig, axes = plt.subplots(len(pairs), 5, figsize=(15, 3.0 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        qp, cp, qc = l2n(pair["query_patches"]), l2n(pair["cand_patches"]), l2n(pair["query_center"])
        correlation = np.maximum(qp @ qc, 0)
        _heat(row[0], pair["query_image"], correlation, pair["query_positions"], f"{pair['title']}: CLS-to-patch")
        _heat(row[1], pair["query_image"], np.exp(-correlation / temperature), pair["query_positions"],
              "inverse cross-correlation")
        plan = np.asarray(pair["plan"])
        source = int(plan.sum(axis=0).argmax())
        _heat(row[2], pair["query_image"], qp @ qp[source], pair["query_positions"], "patch-to-patch (boxed patch)")
        x, y = pair["query_positions"][source]
        cell = pair["query_image"].shape[1] / np.sqrt(len(qp))
        row[2].add_patch(plt.Rectangle((x - cell / 2, y - cell / 2), cell, cell, fill=False, color="red", lw=2))
        _heat(row[3], pair["cand_image"], np.maximum(cp @ qc, 0), pair["cand_positions"],
              "candidate: cross-correlation")
        for spine in row[3].spines.values():
            spine.set_edgecolor(COLOURS.get(pair["status"], "#000000"))
            spine.set_linewidth(4)
        # top matches of the transport plan, drawn across the two images side by side
        qh, qw = pair["query_image"].shape[:2]
        ch, cw = pair["cand_image"].shape[:2]
        height = max(qh, ch)
        canvas = np.full((height, qw + cw, 3), 255, np.uint8)
        canvas[:qh, :qw], canvas[:ch, qw:] = pair["query_image"], pair["cand_image"]
        row[4].imshow(canvas)
        for flat in np.argsort(plan.ravel())[::-1][:top]:
            c, q = np.unravel_index(flat, plan.shape)
            (x0, y0), (x1, y1) = pair["query_positions"][q], pair["cand_positions"][c]
            row[4].plot([x0, x1 + qw], [y0, y1], "-o", color="#ffd700", lw=2, ms=4)
        row[4].set_xticks([]), row[4].set_yticks([])
        row[4].set_title(f"top-{top} transport matches", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def structural_pairs(bench, stores: dict, ranked: np.ndarray, options: dict, n_queries: int = 3) -> list[dict]:
    """Each of the first ``n_queries`` queries with its top-1 after structural reranking: images, patch grids and
    the transport plan, for :func:`structural_figure`."""
    from rrt_dist.rerank.options import StructuralConfig
    from rrt_dist.rerank.structural import transport_plans
    from rrt_dist.store import take_locals_from

    cfg = StructuralConfig(**options)
    ranked = _without_self(bench, ranked)
    query_ids = bench.queries.column("id").to_numpy()
    q_uris, g_uris = bench.queries.column("uri").to_pylist(), bench.gallery.column("uri").to_pylist()
    q_boxes = bench.queries.column("bbox").to_pylist()
    galleries = [stores[name] for name in ("gallery", "distractor") if name in stores]
    pairs = []
    for q in range(len(query_ids)):
        if len(pairs) == n_queries:
            break
        if ranked[q, 0] < 0 or not stores["query"].contains([query_ids[q]])[0]:
            continue
        query = stores["query"].take_locals([query_ids[q]])
        cand = take_locals_from(galleries, ranked[q, :1])
        parts = transport_plans(query["local"][0], query["global"][0], cand["local"], cand["global"], **asdict(cfg))
        qp, cp = query["local"][0], cand["local"][0]
        gallery_index = int(bench.gallery_indices(ranked[q, :1])[0])
        box = q_boxes[q]                       # queries are described (and drawn) cropped to their box
        offset = np.zeros(2, np.float32) if box is None else np.floor(np.maximum(box[:2], 0)).astype(np.float32)
        pairs.append({"query_image": load_image(q_uris[q], box), "cand_image": load_image(g_uris[gallery_index]),
                      "query_patches": qp, "cand_patches": cp,
                      "query_center": qp.mean(axis=0) if cfg.center == "mean" else query["global"][0],
                      "query_positions": query["positions"][0] - offset, "cand_positions": cand["positions"][0],
                      "plan": parts["plan"][0].cpu().numpy(), "status": _status(bench, q, gallery_index),
                      "title": f"query {q}"})
    return pairs
