"""The contract every frozen visual encoder meets (:class:`VisualEncoder`), and what the encoder implementations share:
the index of a feature layer and reading a checkpoint folder's tensors.

Implementations: :mod:`merv.models.encoders` (timm and transformers backbones, and the registry that builds an encoder
from its config), :mod:`merv.models.languagebind`, :mod:`merv.models.hiera`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import nn

from merv.config import EncoderConfig
from merv.data.transforms import preprocess_for


def layer_index(feature_layer: int, num_layers: int, encoder_id: str) -> int:
    """``hidden_states`` index (0: embeddings, i: output of block i) of a possibly negative ``feature_layer``."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(
            f"encoder {encoder_id!r}: feature_layer {feature_layer} is outside this {num_layers}-block model "
            f"(valid: -{num_layers + 1}..{num_layers}, or null for the final output)"
        )
    return feature_layer % (num_layers + 1)


class VisualEncoder(nn.Module, ABC):
    """Contract of a visual encoder; subclasses set the attributes below in ``__init__``."""

    embed_dim: int
    temporal_positions: int  # T' in the output
    tokens_per_frame: int  # N in the output: patch tokens only
    prefix_tokens: int = 0  # CLS / register tokens the model produces and the encoder drops

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def num_frames(self) -> int:
        return self.cfg.num_frames

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def transform(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[T, H, W, 3]`` -> normalised float ``[T, 3, S, S]`` for this encoder (from its config)."""
        return preprocess_for(self.cfg)(frames)

    @abstractmethod
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, S, S]`` -> ``[B, T', N, C]``."""


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: from safetensors after its header and values are checked (merv.integrity), else
    from ``pytorch_model.bin`` without unpickling code (``weights_only``), checked finite."""
    from merv.integrity import check_finite, load_verified

    if (path / "model.safetensors").is_file():
        return load_verified(path / "model.safetensors", None)
    if (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        check_finite(state, str(path / "pytorch_model.bin"))
        return state
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
