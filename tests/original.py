"""The original MERV's checkpoint layout and arithmetic, for the import tests.

The layout is the manifest ``tests/data/original_layout.json`` (derived from the original's code, commit named there).
The modules here are composed the way the original composes its own, from torch and transformers parts nobody here
wrote (``nn.Linear`` inside the projector wrappers, ``nn.MultiheadAttention`` with a learnable query, a
``LlamaForCausalLM`` resized by transformers' ``resize_token_embeddings``), so the keys they save are checked against
the manifest, and :func:`reference_logits` is the original's forward written from its equations.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LAYOUT = Path(__file__).parent / "data" / "original_layout.json"


def layout() -> dict:
    return json.loads(LAYOUT.read_text())


def _dim(entry, symbols: dict, i: int | None) -> int:
    if isinstance(entry, int):
        return entry
    if m := re.fullmatch(r"(\d+)\*(\w+)", entry):
        return int(m[1]) * symbols[m[2]]
    if m := re.fullmatch(r"(\w+)\[i\]", entry):
        return symbols[m[1]][i]
    return symbols[entry]


def manifest_shapes(symbols: dict, groups: list[str]) -> dict[str, dict[str, tuple[int, ...]]]:
    """The manifest's keys and shapes of ``groups`` with ``symbols`` filled in (``{i}`` over the encoders, ``{l}``
    over the LLM blocks)."""
    out = {}
    for group in groups:
        keys = {}
        for template, shape in layout()["groups"][group].items():
            if "{i}" in template:
                for i in range(len(symbols["C"])):
                    keys[template.format(i=i)] = tuple(_dim(d, symbols, i) for d in shape)
            elif "{l}" in template:
                for block in range(symbols["L"]):
                    keys[template.format(l=block)] = tuple(_dim(d, symbols, None) for d in shape)
            else:
                keys[template] = tuple(_dim(d, symbols, None) for d in shape)
        out[group] = keys
    return out


class _Holder(nn.Module):
    """A module holding one child under a given name (the original's wrapper classes, reduced to their state)."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def original_projectors(widths: list[int], dim: int) -> nn.ModuleList:
    """``ModuleList`` of AveragePooling3DProjector(projector=LinearProjector(projector=Linear, layernorm=Identity))."""
    return nn.ModuleList(
        _Holder(projector=_Holder(projector=nn.Linear(c, dim), layernorm=nn.Identity())) for c in widths
    )


class OriginalFusion(nn.Module):
    """CrossAttentionAdapterLearnableQuery with averaged tokens: one-head attention, learnable ``Q [1, A]``."""

    def __init__(self, attn_dim: int, dim: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(attn_dim, 1, dropout=0.0, batch_first=True, kdim=dim, vdim=dim)
        self.Q = nn.Parameter(torch.empty(1, attn_dim))
        nn.init.xavier_uniform_(self.Q)

    def forward(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's arithmetic: attention weights of Q over the encoders' mean tokens, then ``bmm`` of those
        weights with the flattened token sequences."""
        b, e = tokens[0].shape[0], len(tokens)
        length, dim = tokens[0].shape[1:]
        v = torch.stack(tokens, 1)  # [B, E, L, D]
        query = self.Q.repeat(b, 1).unsqueeze(1)  # [B, 1, A]
        summary = v.mean(2)  # [B, E, D]
        _, weights = self.attention(query=query, key=summary, value=summary)  # [B, 1, E]
        fused = torch.bmm(weights, v.reshape(b, e, length * dim)).reshape(b, length, dim)
        return fused, weights[:, 0]


def original_llm(folder: Path, noise: float = 0.02, seed: int = 11, pad: bool = True):
    """The original's LLM backbone for a Llama folder: loaded in float32 (the original's ``from_pretrained`` takes
    no dtype), a ``<PAD>`` token added and the rows resized to a multiple of 64; every weight then moved off the
    folder's values (as training does), so a model that kept the folder's weights, or held them in half precision,
    shows. Returns ``(backbone with .llm, tokenizer)``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if pad:  # pad=False: the vocabulary as the folder has it (a benchmark measuring code without this step)
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
        llm.config.pad_token_id = tokenizer.pad_token_id
        llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in llm.parameters():
            p.add_(noise * torch.randn(p.shape, generator=generator))
    return _Holder(llm=llm), tokenizer


def original_state(projectors: nn.Module, llm_backbone: nn.Module, fusion: nn.Module | None) -> dict:
    """The ``model`` dict the original's FSDP strategy saves after stage 2: each trainable group's state dict."""
    state = {
        "projectors": {k: v.detach().clone() for k, v in projectors.state_dict().items()},
        "llm_backbone": {k: v.detach().clone() for k, v in llm_backbone.state_dict().items()},
    }
    if fusion is not None:
        state["feature_fusion"] = {k: v.detach().clone() for k, v in fusion.state_dict().items()}
    return state


def save_original(path: Path, model_state: dict) -> Path:
    """``torch.save`` as the original's ``save_checkpoint`` does (optimizer state and step at the top level)."""
    optimizer = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}}, "param_groups": []}
    torch.save({"model": model_state, "optimizer": optimizer, "lr_scheduler": {"last_epoch": 5}, "step": 5}, path)
    return path


def pool_project(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, frames: int, side: int):
    """AveragePooling3DProjector: ``B F (H W) C -> B C F H W``, adaptive 3-D average pooling to ``(frames, side,
    side)``, ``B C F H W -> B (F H W) C``, then the linear head."""
    b, f, n, c = features.shape
    h = int(math.sqrt(n))
    grid = features.reshape(b, f, h, h, c).permute(0, 4, 1, 2, 3)
    pooled = F.adaptive_avg_pool3d(grid, (frames, side, side))
    return F.linear(pooled.permute(0, 2, 3, 4, 1).reshape(b, frames * side * side, c), weight, bias)


def reference_logits(
    features: list[torch.Tensor], input_ids: torch.Tensor, state: dict, llm, frames: int, side: int
) -> torch.Tensor:
    """The original's forward on the original's tensors: project each encoder's features, fuse with the learnable
    query, splice the visual tokens after BOS, run the LLM (``llm`` holds the checkpoint's LLM weights)."""
    tokens = [
        pool_project(
            x,
            state["projectors"][f"{i}.projector.projector.weight"],
            state["projectors"][f"{i}.projector.projector.bias"],
            frames,
            side,
        )
        for i, x in enumerate(features)
    ]
    fusion_state = state["feature_fusion"]
    attn_dim, dim = fusion_state["Q"].shape[-1], tokens[0].shape[-1]
    fusion = OriginalFusion(attn_dim, dim)
    fusion.load_state_dict(fusion_state)
    fused, _ = fusion(tokens)  # [B, L, D]
    embeds = llm.get_input_embeddings()(input_ids)
    spliced = torch.cat([embeds[:, :1], fused, embeds[:, 1:]], dim=1)
    return llm(inputs_embeds=spliced, attention_mask=torch.ones(spliced.shape[:2], dtype=torch.long)).logits
