"""Reranking Transformer (RRT, Tan et al., ICCV 2021): scores an image pair from global + local descriptors.

DELG setting (the paper's Eq. 1-4, as the released model computes them)::

    x = [CLS; g; l_1..l_L; SEP; g'; l'_1..l'_L]
    g  = l2n(remap(global)) + seg[src-global]          (remap: 2048 -> 128)
    l_i = l2n(local_i) + scale_emb[scale_i] + seg[src-local]
    CLS = seg[CLS], SEP = seg[SEP]                      (the tokens are their segment embeddings)
    6 post-norm layers: x = LN(x + MHA(x)); x = LN(x + MLP(x))   (h=4, MLP 1024, ReLU, no final LN)
    logit = classifier(x_CLS)

Padded locals (mask True) are excluded from attention. Segment ids: src-local 0, tgt-local 1,
CLS 2, SEP 3, src-global 4, tgt-global 5. This configuration has 2,243,201 parameters.
Parameter names follow the released checkpoints (``remap``, ``scale_encoder``, ``seg_encoder``,
``encoder.layers.{i}.self_attn.in_proj_weight`` ..., ``classifier``).

Other settings: ``use_global=False`` drops the two global tokens (SOP / dense grids), and
``position_encoding="sine2d"`` replaces the scale embedding with a fixed 2-D sine embedding of
the locals' (x, y) positions (pass ``src_positions`` / ``tgt_positions``).
"""
from __future__ import annotations

import math

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from rrt_dist.schema import ConfigError, RRTConfig

SRC_LOCAL, TGT_LOCAL, CLS, SEP, SRC_GLOBAL, TGT_GLOBAL = range(6)


class EncoderLayer(nn.Module):
    """Post-norm transformer layer with the parameter names of ``nn.TransformerEncoderLayer``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.heads, self.dropout = heads, dropout

    def _heads(self, x: torch.Tensor):
        b, n, d = x.shape
        q, k, v = F.linear(x, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias).chunk(3, dim=-1)
        return (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))

    def attention(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The attention weights this layer applies to ``x``, averaged over heads: ``[B, N, N]`` (rows sum to 1)
        — what the fused kernel of :meth:`forward` computes and never returns."""
        q, k, _ = self._heads(x)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return scores.masked_fill(~allowed[:, None, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._heads(x)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :],
                                              dropout_p=self.dropout if self.training else 0.0)
        attn = self.self_attn.out_proj(attn.transpose(1, 2).reshape(b, n, d))
        x = self.norm1(x + F.dropout(attn, self.dropout, self.training))
        mlp = self.linear2(F.dropout(F.relu(self.linear1(x)), self.dropout, self.training))
        return self.norm2(x + F.dropout(mlp, self.dropout, self.training))


class Encoder(nn.Module):
    def __init__(self, cfg: RRTConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg.model_dim, cfg.num_heads, cfg.mlp_dim, cfg.dropout)
                                    for _ in range(cfg.num_layers))

    def forward(self, x, allowed):
        for layer in self.layers:
            x = layer(x, allowed)
        return x


def sine_2d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine embedding of ``[..., 2]`` (x, y) positions: half the channels for x, half for y."""
    quarter = dim // 4
    freq = temperature ** (-torch.arange(quarter, device=positions.device, dtype=torch.float32) / quarter)
    parts = []
    for axis in (0, 1):
        angle = positions[..., axis:axis + 1].float() * freq
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=-1)


class RerankingTransformer(nn.Module):
    def __init__(self, cfg: RRTConfig | None = None, **overrides):
        super().__init__()
        self.cfg = cfg = RRTConfig(**overrides) if cfg is None else cfg
        if cfg.position_encoding not in ("scale", "sine2d"):
            raise ValueError(f"position_encoding must be 'scale' or 'sine2d', got {cfg.position_encoding!r}")
        if cfg.use_global:
            self.remap = nn.Linear(cfg.global_dim, cfg.model_dim)
        if cfg.position_encoding == "scale":
            self.scale_encoder = nn.Embedding(cfg.num_scales, cfg.model_dim)
        self.seg_encoder = nn.Embedding(6, cfg.model_dim)
        self.encoder = Encoder(cfg)
        self.classifier = nn.Linear(cfg.model_dim, 1)
        if cfg.local_dim != cfg.model_dim:
            raise ValueError("local descriptors enter the encoder directly: local_dim must equal model_dim")

    def _locals(self, local, scales, positions, segment):
        x = F.normalize(local, p=2, dim=-1)
        if self.cfg.position_encoding == "scale":
            x = x + self.scale_encoder(scales)
        else:
            if positions is None:
                raise ValueError("position_encoding='sine2d' needs src_positions / tgt_positions")
            x = x + sine_2d(positions, self.cfg.model_dim)
        return x + self.seg_encoder.weight[segment]

    def _tokens(self, src_global, src_local, src_mask, src_scales, tgt_global, tgt_local, tgt_mask, tgt_scales,
                src_positions=None, tgt_positions=None):
        """The encoder's input ``[B, N, D]``, which tokens attention may read (``[B, N]``), and where the source's
        and the target's locals start."""
        b = src_local.shape[0]
        seg = self.seg_encoder.weight
        tokens = [seg[CLS].expand(b, 1, -1)]
        allowed = [src_mask.new_ones(b, 1)]
        if self.cfg.use_global:
            tokens.append((F.normalize(self.remap(src_global), p=2, dim=-1) + seg[SRC_GLOBAL])[:, None])
            allowed.append(src_mask.new_ones(b, 1))
        src_start = sum(t.shape[1] for t in tokens)
        tokens.append(self._locals(src_local, src_scales, src_positions, SRC_LOCAL))
        allowed.append(~src_mask)
        tokens.append(seg[SEP].expand(b, 1, -1))
        allowed.append(src_mask.new_ones(b, 1))
        if self.cfg.use_global:
            tokens.append((F.normalize(self.remap(tgt_global), p=2, dim=-1) + seg[TGT_GLOBAL])[:, None])
            allowed.append(src_mask.new_ones(b, 1))
        tgt_start = sum(t.shape[1] for t in tokens)
        tokens.append(self._locals(tgt_local, tgt_scales, tgt_positions, TGT_LOCAL))
        allowed.append(~tgt_mask)
        return torch.cat(tokens, dim=1), torch.cat(allowed, dim=1).bool(), src_start, tgt_start

    def forward(self, src_global, src_local, src_mask, src_scales, tgt_global, tgt_local, tgt_mask, tgt_scales,
                src_positions=None, tgt_positions=None) -> torch.Tensor:
        """Raw logits ``[B]``; masks are True at padding; scales are integer scale indices."""
        x, allowed, _, _ = self._tokens(src_global, src_local, src_mask, src_scales, tgt_global, tgt_local, tgt_mask,
                                        tgt_scales, src_positions, tgt_positions)
        return self.classifier(self.encoder(x, allowed)[:, 0]).view(-1)

    def cls_attention(self, *inputs, **positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s logits, and how much the last layer's classification token attends to each source
        and each target local (``[B, L_src]``, ``[B, L_tgt]``; 0 at padding): what the logit reads, for figures."""
        x, allowed, src_start, tgt_start = self._tokens(*inputs, **positions)
        *first, last = self.encoder.layers
        for layer in first:
            x = layer(x, allowed)
        weights = last.attention(x, allowed)[:, 0]
        logits = self.classifier(last(x, allowed)[:, 0]).view(-1)
        n_src, n_tgt = inputs[1].shape[1], inputs[5].shape[1]
        return logits, weights[:, src_start:src_start + n_src], weights[:, tgt_start:tgt_start + n_tgt]


def clean_state_dict(checkpoint) -> OrderedDict:
    """A bare state dict from a released checkpoint (``{'state': ..., 'optim': ...}`` or bare), ``module.`` stripped."""
    state = checkpoint.get("state", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


def load_released_checkpoint(path, **overrides) -> RerankingTransformer:
    """Load a checkpoint published with the RRT paper (or saved by this project) in eval mode.

    Checkpoints saved by ``rrt_dist.train`` also record ``max_local``, the locals per image the model
    was trained with, and ``global_weight``, the fusion weight it is meant to be used with; they are kept as
    ``model.max_local`` (None for released weights) and ``model.global_weight`` (0: the paper's RRT) for the scorer.
    """
    return model_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True), **overrides)


def model_from_checkpoint(checkpoint, **overrides) -> RerankingTransformer:
    """:func:`load_released_checkpoint` on a checkpoint already loaded (``torch.load``)."""
    state = clean_state_dict(checkpoint)
    if "remap.weight" in state:
        overrides.setdefault("global_dim", state["remap.weight"].shape[1])
    else:
        overrides.setdefault("use_global", False)
    if "scale_encoder.weight" in state:
        overrides.setdefault("num_scales", state["scale_encoder.weight"].shape[0])
    else:
        overrides.setdefault("position_encoding", "sine2d")
    layers = {k.split(".")[2] for k in state if k.startswith("encoder.layers.")}
    overrides.setdefault("num_layers", len(layers))
    model = RerankingTransformer(**overrides)
    model.load_state_dict(state, strict=True)
    saved = checkpoint if isinstance(checkpoint, dict) else {}
    model.max_local = saved.get("max_local")
    model.global_weight = saved.get("global_weight") or 0.0
    return model.eval()


def check_checkpoint(path, key: str = "reranker.checkpoint") -> None:
    """Load the weights at ``path`` as the RRT scorer will, on the driver before any work starts; what is not an
    RRT checkpoint is refused with a ConfigError naming ``key`` and the file (never torch's own advice)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{key}={path}: no such file") from None
    except Exception as err:       # unpickling, zip and end-of-file errors: not a checkpoint torch can read safely
        raise ConfigError(f"{key}={path}: not a PyTorch checkpoint ({type(err).__name__})") from None
    try:
        model_from_checkpoint(checkpoint)
    except Exception as err:       # no state dict, or tensors of another model
        reason = str(err).split("\n\t")
        raise ConfigError(f"{key}={path}: not an RRT checkpoint ({'; '.join(line.strip() for line in reason[1:3]) or reason[0]})"
                          .replace("\n", " ")) from None


def recorded_global_weight(path) -> float:
    """The fusion weight a checkpoint records (its validation's choice with ``train.global_fusion``; else 0)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return float((checkpoint.get("global_weight") if isinstance(checkpoint, dict) else None) or 0.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
