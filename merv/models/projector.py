"""Projectors: per-encoder features ``[B, T', N, C]`` -> a fixed visual token grid ``[B, T_out * n, D]``.

Because every encoder is pooled to the same ``(T_out, side, side)`` grid, token ``i`` of every encoder refers to the
same place and time: the spatio-temporal alignment that lets fusion add encoders token by token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from merv.config import ProjectorConfig


def make_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector head {kind!r}; available: ['linear', 'mlp']")


class AvgPool3dProjector(nn.Module):
    """Adaptive 3-D average pooling to ``(T_out, side, side)``, then a linear or MLP head."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.head = make_head(cfg.head, in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, t, n, c = features.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"avgpool3d needs a square patch grid, got {n} tokens per frame")
        grid = features.permute(0, 3, 1, 2).reshape(b, c, t, side, side)  # [B, C, T', h, w]
        out = (self.cfg.temporal_tokens, self.cfg.grid_side, self.cfg.grid_side)
        pooled = F.adaptive_avg_pool3d(grid, out)  # [B, C, T_out, s, s]
        tokens = pooled.flatten(2).transpose(1, 2)  # [B, T_out*s*s, C]
        return self.head(tokens)  # [B, T_out*s*s, D]


PROJECTORS = {"avgpool3d": AvgPool3dProjector}


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    try:
        return PROJECTORS[cfg.pooling](cfg, in_dim, out_dim)
    except KeyError:
        raise ValueError(f"unknown projector pooling {cfg.pooling!r}; available: {sorted(PROJECTORS)}") from None
