"""Structural similarity (DIML; reranking with pretrained vision transformers): correlation-weighted optimal
transport between two images' patch (grid-cell) features.

For a query with patches ``P_q [R, C]`` and centre ``c_q [C]`` and a candidate with ``P_n [R, C]``, ``c_n``
(all L2-normalised; ``center="mean"`` replaces a centre by the normalised mean of its patches)::

    sim[i, j] = <P_n[i], P_q[j]>                      candidate patch i against query patch j
    K         = exp(-(1 - sim) / ot_temp)             transport kernel
    u[i]      = w(relu(<c_q, P_n[i]>))                candidate-side marginal
    v[j]      = w(relu(<P_q[j], c_n>))                query-side marginal
    w         = correlation: x | inverse: exp(-x / temperature) | minus: 1 - x
    u, v      normalised: w / (sum(w) + 1e-5), except uniform: exactly 1 / R (as the reference fills it)
    Sinkhorn  r = u / (K c),  c = v / (K^T r), from r = c = 1, at most ``max_iter`` times, stopping when the
              mean |change of r| over the whole batch falls below ``stop_tol``
    T         = diag(r) K diag(c);   score = sum(T * sim)
              (T = 0 where u or v has no mass: every cell anti-correlated with the other image's centre)

``inverse`` is the paper's inverse cross-correlation for transformers, whose CLS token is closer to the
background than to the object. ``ot_part`` < 1 gives partial transport: a dummy bin on each side takes
``1 - ot_part`` of the mass at no cost, so unmatched patches need not be transported.
The final ranking reorders the global top-K by structural + global cosine (:func:`structural_rerank_scores`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rrt_dist.rerank.options import CENTERS, WEIGHTINGS


def _marginal(x: torch.Tensor, weighting: str, temperature: float) -> torch.Tensor:
    if weighting == "uniform":
        return torch.full_like(x, 1.0 / x.shape[-1])
    x = F.relu(x)
    if weighting == "correlation":
        w = x
    elif weighting == "inverse":
        w = torch.exp(-x / temperature)
    else:
        w = 1 - x
    return w / (w.sum(dim=-1, keepdim=True) + 1e-5)


def sinkhorn(K: torch.Tensor, u: torch.Tensor, v: torch.Tensor, max_iter: int = 100,
             stop_tol: float = 0.1) -> torch.Tensor:
    """Transport plans ``[N, R, R']`` of kernels ``K`` with marginals ``u [N, R]``, ``v [N, R']`` (batch-wide stop)."""
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(max_iter):
        previous = r
        r = u / (K @ c.unsqueeze(-1)).squeeze(-1)
        c = v / (K.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
        if (r - previous).abs().mean().item() < stop_tol:
            break
    return r.unsqueeze(-1) * K * c.unsqueeze(-2)


def _as_tensor(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)).to(device)


def transport_plans(query_patches, query_center, cand_patches, cand_centers, *, weighting: str = "correlation",
                    temperature: float = 0.1, ot_temp: float = 0.05, center: str = "cls", max_iter: int = 100,
                    stop_tol: float = 0.1, ot_part: float = 1.0) -> dict:
    """The pieces of :func:`structural_similarity` as tensors in the inputs' dtype: ``plan`` and ``sim``
    ``[N, R_cand, R_query]``, the marginals ``u [N, R_cand]`` and ``v [N, R_query]`` (for figures: which patches
    the transport matches, and how the centre weighs them)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    if not 0 < ot_part <= 1:
        raise ValueError(f"ot_part must be in (0, 1], got {ot_part}")
    numpy_in = not isinstance(query_patches, torch.Tensor)
    device = (torch.device("cuda") if numpy_in and torch.cuda.is_available() else
              torch.device("cpu") if numpy_in else query_patches.device)
    qp, qc, cp, cc = (_as_tensor(x, device) for x in (query_patches, query_center, cand_patches, cand_centers))
    if cp.ndim != 3 or qp.ndim != 2 or cp.shape[2] != qp.shape[1]:
        raise ValueError(f"expected query [R, C] and candidates [N, R, C], got {tuple(qp.shape)} and {tuple(cp.shape)}")
    qp, cp = F.normalize(qp, dim=-1), F.normalize(cp, dim=-1)
    if center == "mean":
        qc, cc = qp.mean(dim=0), cp.mean(dim=1)
    qc, cc = F.normalize(qc, dim=-1), F.normalize(cc, dim=-1)
    sim = torch.einsum("nic,jc->nij", cp, qp)                            # [N, R_cand, R_query]
    K = torch.exp(-(1 - sim) / ot_temp)
    u = _marginal(torch.einsum("c,nic->ni", qc, cp), weighting, temperature)
    v = _marginal(torch.einsum("jc,nc->nj", qp, cc).contiguous(), weighting, temperature)
    # A side whose cells all anti-correlate with the other's centre has no mass: nothing is transported (plan 0,
    # score 0). Sinkhorn on it would divide by zero and give NaN; it runs on uniform marginals instead.
    empty = (u.sum(dim=-1) <= 0) | (v.sum(dim=-1) <= 0)
    u_run = torch.where(empty[:, None], 1.0 / max(u.shape[-1], 1), u)
    v_run = torch.where(empty[:, None], 1.0 / max(v.shape[-1], 1), v)
    if len(cp) == 0:
        plan = K
    elif ot_part < 1:
        n, ri, rj = K.shape
        padded = K.new_ones(n, ri + 1, rj + 1)                         # to / from the dummy bin: cost 0
        padded[:, :ri, :rj] = K
        padded[:, ri, rj] = 0                                          # dummy to dummy: never
        dummy = u.new_full((n, 1), 1 - ot_part)
        plan = sinkhorn(padded, torch.cat([ot_part * u_run, dummy], 1), torch.cat([ot_part * v_run, dummy], 1),
                        max_iter, stop_tol)[:, :ri, :rj]
    else:
        plan = sinkhorn(K, u_run, v_run, max_iter, stop_tol)
    return {"plan": plan.masked_fill(empty[:, None, None], 0), "sim": sim, "u": u, "v": v}


def structural_similarity(query_patches, query_center, cand_patches, cand_centers, *, weighting: str = "correlation",
                          temperature: float = 0.1, ot_temp: float = 0.05, center: str = "cls", max_iter: int = 100,
                          stop_tol: float = 0.1, ot_part: float = 1.0):
    """Structural scores ``[N]`` of N candidates against one query (shapes ``[R, C]``, ``[C]``, ``[N, R, C]``,
    ``[N, C]``), in the inputs' dtype; numpy in -> numpy out (computed on the GPU when there is one), tensors in
    -> tensors out on their device."""
    parts = transport_plans(query_patches, query_center, cand_patches, cand_centers, weighting=weighting,
                            temperature=temperature, ot_temp=ot_temp, center=center, max_iter=max_iter,
                            stop_tol=stop_tol, ot_part=ot_part)
    scores = (parts["plan"] * parts["sim"]).sum(dim=(1, 2))
    return scores if isinstance(query_patches, torch.Tensor) else scores.cpu().numpy()
