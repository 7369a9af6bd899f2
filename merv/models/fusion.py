"""Fusion of the per-encoder visual token sequences (all ``[B, L, D]``, spatio-temporally aligned)."""

from __future__ import annotations

import math

import torch
from torch import nn

from merv.config import FusionConfig


class CrossAttentionFusion(nn.Module):
    """MERV's default: one learnable query attends over one summary vector per encoder.

    ``w = softmax(q . K(mean_L x_e) / sqrt(D))`` over encoders e, per sample; output ``sum_e w_e x_e``.
    """

    def __init__(self, dim: int, num_encoders: int):
        super().__init__()
        # a zero query would give the key projection no gradient at the first step
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.key = nn.Linear(dim, dim)
        self.num_encoders = num_encoders

    def weights(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        summary = torch.stack([x.mean(dim=1) for x in tokens], dim=1)  # [B, E, D]
        scores = self.key(summary) @ self.query / math.sqrt(summary.shape[-1])  # [B, E]
        return scores.softmax(dim=-1)

    def forward(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights(tokens)  # [B, E]
        fused = torch.einsum("be,beld->bld", w, torch.stack(tokens, dim=1))  # [B, L, D]
        return fused, w


FUSIONS = {"cross_attention": CrossAttentionFusion}


def build_fusion(cfg: FusionConfig, dim: int, num_encoders: int) -> nn.Module:
    try:
        return FUSIONS[cfg.kind](dim, num_encoders)
    except KeyError:
        raise ValueError(f"unknown fusion kind {cfg.kind!r}; available: {sorted(FUSIONS)}") from None
