"""Projectors: per-encoder features ``[B, T', N, C]`` -> a fixed visual token grid ``[B, T_out * n, D]``.

Every encoder is brought to the same ``(T_out, side, side)`` grid, so token ``i`` of every encoder refers to the same
place and time: the spatio-temporal alignment that lets fusion combine encoders token by token.
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


def to_grid(features: torch.Tensor) -> torch.Tensor:
    """``[B, T, N, C]`` with a square patch grid -> ``[B, C, T, h, w]``."""
    b, t, n, c = features.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the projector needs a square patch grid, got {n} tokens per frame")
    return features.permute(0, 3, 1, 2).reshape(b, c, t, side, side)


def from_grid(grid: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, h, w]`` -> tokens ``[B, T*h*w, C]`` in (time, row, column) order."""
    return grid.flatten(2).transpose(1, 2)


class Projector(nn.Module):
    """Base: ``forward = head(pool(features))``; subclasses define ``pool`` and the width it returns."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, pooled_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.head = make_head(cfg.head, pooled_dim or in_dim, out_dim)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """``[B, T', N, C]`` encoder features (or, with ``pooled``, an already pooled grid ``[B, T_out*n, C]`` from
        a feature cache) -> ``[B, T_out*n, D]``. Called as a whole, so that FSDP gathers the projector's weights."""
        return self.head(features if pooled else self.pool(features))


class AvgPool3dProjector(Projector):
    """Adaptive 3-D average pooling to ``(T_out, side, side)`` (MERV's default)."""

    def pool(self, features):
        out = (self.cfg.temporal_tokens, self.cfg.grid_side, self.cfg.grid_side)
        return from_grid(F.adaptive_avg_pool3d(to_grid(features), out))


class AvgPool2dProjector(Projector):
    """Per-frame 2-D average pooling to ``side x side``; time is subsampled (nearest frame), never averaged."""

    def pool(self, features):
        grid = to_grid(features)  # [B, C, T', h, w]
        t_in = grid.shape[2]
        pick = [
            min(t_in - 1, int((i + 0.5) * t_in / self.cfg.temporal_tokens)) for i in range(self.cfg.temporal_tokens)
        ]
        grid = grid[:, :, pick]
        b, c, t, h, w = grid.shape
        pooled = F.adaptive_avg_pool2d(grid.transpose(1, 2).reshape(b * t, c, h, w), self.cfg.grid_side)
        return from_grid(pooled.reshape(b, t, c, self.cfg.grid_side, self.cfg.grid_side).transpose(1, 2))


class Conv3dProjector(Projector):
    """A learned 3-D convolution (kernel = stride = 2) over the grid average-pooled to twice the output size."""

    def __init__(self, cfg, in_dim, out_dim):
        super().__init__(cfg, in_dim, out_dim, pooled_dim=out_dim)
        self.conv = nn.Conv3d(in_dim, out_dim, kernel_size=2, stride=2)

    def pool(self, features):
        out = (2 * self.cfg.temporal_tokens, 2 * self.cfg.grid_side, 2 * self.cfg.grid_side)
        return from_grid(self.conv(F.adaptive_avg_pool3d(to_grid(features), out)))


class AttentivePoolProjector(Projector):
    """``T_out * n`` learned queries attend over all of an encoder's tokens (one multi-head attention layer)."""

    def __init__(self, cfg, in_dim, out_dim):
        super().__init__(cfg, in_dim, out_dim)
        heads = next(h for h in (8, 4, 2, 1) if in_dim % h == 0)
        self.queries = nn.Parameter(torch.randn(cfg.visual_tokens, in_dim) * in_dim**-0.5)
        self.norm = nn.LayerNorm(in_dim)
        self.attn = nn.MultiheadAttention(in_dim, heads, batch_first=True)

    def pool(self, features):
        keys = self.norm(features.flatten(1, 2))  # [B, T'*N, C]
        queries = self.queries.expand(features.shape[0], -1, -1)  # [B, T_out*n, C]
        return self.attn(queries, keys, keys, need_weights=False)[0]


PROJECTORS: dict[str, type[Projector]] = {
    "avgpool3d": AvgPool3dProjector,
    "avgpool2d": AvgPool2dProjector,
    "conv3d": Conv3dProjector,
    "attentive": AttentivePoolProjector,
}


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int) -> Projector:
    try:
        cls = PROJECTORS[cfg.pooling]
    except KeyError:
        raise ValueError(f"unknown projector pooling {cfg.pooling!r}; available: {sorted(PROJECTORS)}") from None
    return cls(cfg, in_dim, out_dim)
