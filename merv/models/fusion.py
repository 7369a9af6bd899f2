"""Fusion of the per-encoder visual token sequences (each ``[B, L, D]``, spatio-temporally aligned).

Every fusion returns ``(tokens [B, L', D], weights [B, E] or None)``; weights are the per-encoder mixing weights
where the fusion has them (they sum to 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from merv.config import FusionConfig


class CrossAttentionFusion(nn.Module):
    """MERV's default: one learnable query attends over one summary vector per encoder, one head.

    Parameterised as the original's ``nn.MultiheadAttention(embed_dim=A, kdim=D)`` with a learnable ``Q [1, A]``:
    ``q = W_q Q + b_q``, ``k_e = W_k mean_L(x_e) + b_k``, ``w = softmax_e(q . k_e / sqrt(A))`` per sample, output
    ``sum_e w_e x_e`` (the attention's value and output projections are never used, so they are not held). ``Q``,
    ``W_q`` and ``W_k`` start xavier-uniform and the biases at zero, and ``Q`` is 2-D, so weight decay reaches it as
    in the original. Over one encoder the weight is always 1 (the original's single-encoder models).
    """

    def __init__(self, dim: int, num_encoders: int, attn_dim: int | None = None):
        super().__init__()
        attn_dim = attn_dim or dim
        self.query = nn.Parameter(torch.empty(1, attn_dim))  # the original's Q
        self.q_proj = nn.Linear(attn_dim, attn_dim)
        self.key = nn.Linear(dim, attn_dim)
        for weight in (self.query, self.q_proj.weight, self.key.weight):
            nn.init.xavier_uniform_(weight)
        nn.init.zeros_(self.q_proj.bias)
        nn.init.zeros_(self.key.bias)

    def weights(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        summary = torch.stack([x.mean(dim=1) for x in tokens], dim=1)  # [B, E, D]
        q = self.q_proj(self.query)[0]  # [A]
        scores = self.key(summary) @ q / math.sqrt(q.shape[0])  # [B, E]
        return scores.softmax(dim=-1)

    def forward(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights(tokens)  # [B, E]
        fused = torch.einsum("be,beld->bld", w, torch.stack(tokens, dim=1))  # [B, L, D]
        return fused, w


class LearnableScalarFusion(nn.Module):
    """One learned weight per encoder, the same for every sample: ``sum_e softmax(a)_e x_e``."""

    def __init__(self, dim: int, num_encoders: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_encoders))

    def forward(self, tokens):
        w = self.logits.softmax(dim=0).expand(tokens[0].shape[0], -1)  # [B, E]
        return torch.einsum("be,beld->bld", w, torch.stack(tokens, dim=1)), w


class ChannelConcatFusion(nn.Module):
    """Concatenate the encoders' tokens along channels, then a linear map back to D: ``W [x_1; ...; x_E] + b``."""

    def __init__(self, dim: int, num_encoders: int):
        super().__init__()
        self.proj = nn.Linear(num_encoders * dim, dim)

    def forward(self, tokens):
        return self.proj(torch.cat(tokens, dim=-1)), None  # [B, L, D]


class SequenceConcatFusion(nn.Module):
    """Concatenate the encoders' token sequences: ``E * L`` visual tokens (no parameters)."""

    def __init__(self, dim: int, num_encoders: int):
        super().__init__()

    def forward(self, tokens):
        return torch.cat(tokens, dim=1), None  # [B, E*L, D]


class SingleEncoderFusion(nn.Module):
    """A single-encoder baseline: its tokens pass through."""

    def __init__(self, dim: int, num_encoders: int):
        super().__init__()
        if num_encoders != 1:
            raise ValueError(f"fusion 'single' takes exactly one encoder, got {num_encoders}")

    def forward(self, tokens):
        return tokens[0], torch.ones(tokens[0].shape[0], 1, device=tokens[0].device)


FUSIONS: dict[str, type[nn.Module]] = {
    "cross_attention": CrossAttentionFusion,
    "learnable_scalar": LearnableScalarFusion,
    "channel_concat": ChannelConcatFusion,
    "sequence_concat": SequenceConcatFusion,
    "single": SingleEncoderFusion,
}


def build_fusion(cfg: FusionConfig, dim: int, num_encoders: int) -> nn.Module:
    try:
        cls = FUSIONS[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown fusion kind {cfg.kind!r}; available: {sorted(FUSIONS)}") from None
    if cfg.kind == "cross_attention":
        return cls(dim, num_encoders, cfg.attn_dim)
    return cls(dim, num_encoders)
