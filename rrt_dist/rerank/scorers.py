"""Pair scorers behind one interface: ``scorer(query, candidates) -> scores [K]`` (higher is better); the
registry that names them is ``rrt_dist.rerank.methods``. A scorer that can score the pairs of several queries in one
run (RRT) also has ``score_pairs(queries, owner, candidates) -> scores [P]``, pair ``p`` being query ``owner[p]``
against candidate ``p``.

``query`` holds one image's ``local [L, d]``, ``positions [L, 2]``, ``scales [L]``, ``n_local``
and ``global [d_g]``; ``candidates`` the same for K images, batched (``mask`` True at padding).
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from .gv import gv_scores, inlier_matches
from .options import GVConfig

# Evidence of a pair (``scorer.explain``, for results browsers): points are image pixels (x, y), the query's first.


class GVScorer:
    name = "gv"

    def __init__(self, **cfg):
        self.cfg = GVConfig(**cfg)

    def __call__(self, query: dict, cands: dict) -> np.ndarray:
        if self.cfg.top_locals:
            query, cands = truncate_locals(query, self.cfg.top_locals), truncate_locals(cands, self.cfg.top_locals)
        n = int(query["n_local"])
        return gv_scores(query["local"][:n], query["positions"][:n], cands["local"], cands["positions"],
                         cands["n_local"], self.cfg).astype(np.float64)

    def explain(self, query: dict, cands: dict) -> list[dict]:
        """Per candidate its verified matches ``[[qx, qy, cx, cy], ...]``: as many as its score (the inliers)."""
        if self.cfg.top_locals:
            query, cands = truncate_locals(query, self.cfg.top_locals), truncate_locals(cands, self.cfg.top_locals)
        n = int(query["n_local"])
        out = []
        for local, pos, m in zip(cands["local"], cands["positions"], cands["n_local"]):
            pairs = inlier_matches(query["local"][:n], query["positions"][:n], local[:m], pos[:m], self.cfg)
            out.append({"matches": np.hstack([query["positions"][pairs[:, 0]], pos[pairs[:, 1]]]).tolist()})
        return out


class RRTScorer:
    """RRT logits for a query against its K candidates in batched forward passes (chunked to a memory cap)."""
    name = "rrt"

    def __init__(self, checkpoint: str | None = None, chunk: int | None = None, device: str = "auto",
                 model: torch.nn.Module | None = None, top_locals: int | None = None,
                 global_weight: float | None = None):
        from rrt_dist.models.rrt import load_released_checkpoint

        if (checkpoint is None) == (model is None):
            raise ValueError("RRTScorer needs exactly one of checkpoint (a path) or model (a module)")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.model = (load_released_checkpoint(checkpoint) if model is None else model).to(self.device)
        # Locals per image kept (the highest scoring first): what the model was trained with, if it says.
        self.top_locals = top_locals or getattr(self.model, "max_local", None)   # as trained
        self.global_weight = global_weight if global_weight is not None else getattr(self.model, "global_weight", 0.0)
        # Pairs per forward pass: large on GPU; small on CPU, where [B, h, N, N] attention maps of
        # ~1000-token pairs fall out of cache (batch 20 measured slower than 10 batches of 2).
        self.chunk = chunk or (100 if self.device.type == "cuda" else 4)

    def _inputs(self, queries: dict, owner: np.ndarray, cands: dict, s: int, e: int) -> tuple[tuple, dict]:
        """The model's inputs for pairs ``s:e``: pair ``p`` is query ``owner[p]`` (a row of the stacked ``queries``)
        against candidate ``p`` (positional inputs, and positions by keyword)."""
        rows = owner[s:e]

        def t(x, dtype=torch.float32):
            return torch.as_tensor(np.ascontiguousarray(x), device=self.device).to(dtype)

        src = (t(queries["global"][rows]), t(queries["local"][rows]), t(queries["mask"][rows], torch.bool),
               t(queries["scales"][rows], torch.long))
        tgt = (t(cands["global"][s:e]), t(cands["local"][s:e]), t(cands["mask"][s:e], torch.bool),
               t(cands["scales"][s:e], torch.long))
        positions = {}
        if self.model.cfg.position_encoding == "sine2d":     # the SOP setting embeds (x, y) positions
            positions = {"src_positions": t(queries["positions"][rows]), "tgt_positions": t(cands["positions"][s:e])}
        return (*src, *tgt), positions

    @torch.inference_mode()
    def score_pairs(self, queries: list[dict], owner: np.ndarray, cands: dict) -> np.ndarray:
        """Logits ``[P]`` of pair ``p``: ``queries[owner[p]]`` against candidate ``p`` of ``cands`` (e.g. a batch of
        served requests, each query with its own candidates): all pairs in one chunked run of forward passes."""
        if self.top_locals:
            queries = [truncate_locals(q, self.top_locals) for q in queries]
            cands = truncate_locals(cands, self.top_locals)
        stacked = {key: np.stack([np.asarray(q[key]) for q in queries]) for key in queries[0]}
        out = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        for s in range(0, len(owner), self.chunk):
            inputs, positions = self._inputs(stacked, owner, cands, s, min(len(owner), s + self.chunk))
            with autocast:
                out.append(self.model(*inputs, **positions).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def __call__(self, query: dict, cands: dict) -> np.ndarray:
        return self.score_pairs([query], np.zeros(len(cands["local"]), np.int64), cands)

    @torch.inference_mode()
    def explain(self, query: dict, cands: dict) -> list[dict]:
        """Per candidate the last layer's attention of the classification token to each query and candidate local
        ``[[x, y, weight], ...]`` (fp32; no matches: RRT scores the pair as a whole)."""
        if self.top_locals:
            query, cands = truncate_locals(query, self.top_locals), truncate_locals(cands, self.top_locals)
        out = []
        stacked, owner = {key: np.asarray(v)[None] for key, v in query.items()}, np.zeros(len(cands["local"]), np.int64)
        for s in range(0, len(cands["local"]), self.chunk):
            e = min(len(cands["local"]), s + self.chunk)
            inputs, positions = self._inputs(stacked, owner, cands, s, e)
            _, to_query, to_cand = self.model.cls_attention(*inputs, **positions)
            for i, (wq, wc) in enumerate(zip(to_query.cpu().numpy(), to_cand.cpu().numpy())):
                nq, nc = int(query["n_local"]), int(cands["n_local"][s + i])
                out.append({"matches": [],
                            "query_weights": np.hstack([query["positions"][:nq], wq[:nq, None]]).tolist(),
                            "cand_weights": np.hstack([cands["positions"][s + i][:nc], wc[:nc, None]]).tolist()})
        return out


def truncate_locals(features: dict, max_local: int) -> dict:
    """Keep the first ``max_local`` locals (the extractors store them best first) of one or more images."""
    return {k: v[..., :max_local] if k in ("mask", "scales") else
            v[..., :max_local, :] if k in ("local", "positions") else
            np.minimum(v, max_local) if k == "n_local" else v for k, v in features.items()}


class StructuralScorer:
    """Structural similarity (correlation-weighted optimal transport) of the query's patch grid against each
    candidate's, all candidates of a query in one batched call (as the reference scores them)."""
    name = "structural"
    global_weight = 1.0     # the paper's final order: structural + global cosine, equal weights

    def __init__(self, **cfg):
        from .options import StructuralConfig

        self.cfg = StructuralConfig(**cfg)

    def __call__(self, query: dict, cands: dict) -> np.ndarray:
        from dataclasses import asdict

        from .structural import structural_similarity

        n = int(query["n_local"])
        if np.any(cands["n_local"] != n):
            raise ValueError("structural similarity compares full patch grids: every image needs the same number of "
                             f"locals (query {n}, candidates {sorted(set(cands['n_local'].tolist()))})")
        return structural_similarity(query["local"][:n], query["global"], cands["local"][:, :n], cands["global"],
                                     **asdict(self.cfg)).astype(np.float64)

    def explain(self, query: dict, cands: dict, top: int = 12) -> list[dict]:
        """Per candidate the ``top`` heaviest matches of the transport plan ``[[qx, qy, cx, cy, mass], ...]`` and
        both marginals per patch ``[[x, y, weight], ...]`` (the paper's Figures 1-4 for any pair)."""
        from dataclasses import asdict

        from .structural import transport_plans

        n = int(query["n_local"])
        parts = transport_plans(query["local"][:n], query["global"], cands["local"][:, :n], cands["global"],
                                **asdict(self.cfg))
        q_pos = query["positions"][:n]
        out = []
        for plan, u, v, c_pos in zip(parts["plan"].cpu().numpy(), parts["u"].cpu().numpy(), parts["v"].cpu().numpy(),
                                     cands["positions"][:, :n]):
            heaviest = np.argsort(plan.ravel())[::-1][:top]
            c, q = np.unravel_index(heaviest, plan.shape)
            out.append({"matches": np.hstack([q_pos[q], c_pos[c], plan.ravel()[heaviest, None]]).tolist(),
                        "query_weights": np.hstack([q_pos, v[:, None]]).tolist(),
                        "cand_weights": np.hstack([c_pos, u[:, None]]).tolist()})
        return out
