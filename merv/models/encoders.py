"""Frozen visual encoders behind one contract.

Every encoder takes ``video [B, T, 3, S, S]`` (its own T and S, already normalised by :meth:`transform`) and returns
features ``[B, T', N, C]``: T' temporal positions of N spatial tokens of width C. Prefix tokens (CLS, registers)
are dropped, since MERV's projectors pool over the patch grid.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from merv.config import EncoderConfig


class VisualEncoder(nn.Module, ABC):
    """Contract of a visual encoder; subclasses set the attributes below in ``__init__``."""

    embed_dim: int
    temporal_positions: int  # T' in the output
    tokens_per_frame: int  # N in the output: patch tokens only
    prefix_tokens: int = 0  # CLS / register tokens the model produces and the encoder drops
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

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
        """uint8 frames ``[T, H, W, 3]`` -> normalised float ``[T, 3, S, S]`` for this encoder."""
        x = torch.as_tensor(frames).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @abstractmethod
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, S, S]`` -> ``[B, T', N, C]``."""


class TimmImageEncoder(VisualEncoder):
    """Any timm image model applied to each frame independently (SigLIP, DINOv2, ViT ...)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        import timm

        path = Path(cfg.weights)
        if not path.is_file():
            raise FileNotFoundError(f"encoder {cfg.id!r}: weights file {path} not found")
        # The same path real checkpoints take: timm's pretrained loader, pointed at a local file.
        self.model = timm.create_model(
            cfg.arch,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=0,
            **cfg.model_kwargs,
        )
        data_cfg = self.model.pretrained_cfg
        self.mean = tuple(data_cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(data_cfg.get("std", (0.5, 0.5, 0.5)))
        self.embed_dim = self.model.num_features
        grid = self.model.patch_embed.grid_size
        self.tokens_per_frame = grid[0] * grid[1]
        self.prefix_tokens = self.model.num_prefix_tokens
        self.temporal_positions = cfg.num_frames

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        tokens = self.model.forward_features(video.flatten(0, 1))  # [B*T, prefix + N, C]
        tokens = tokens[:, self.prefix_tokens :]  # drop CLS / registers
        return tokens.unflatten(0, (b, t))  # [B, T, N, C]


def _hf_stats(path: Path) -> tuple[tuple, tuple]:
    """Normalisation mean/std from a transformers folder's ``preprocessor_config.json`` (0.5/0.5 when absent)."""
    processor = path / "preprocessor_config.json"
    stats = json.loads(processor.read_text()) if processor.is_file() else {}
    return tuple(stats.get("image_mean", (0.5, 0.5, 0.5))), tuple(stats.get("image_std", (0.5, 0.5, 0.5)))


def _hf_config_dir(cfg: EncoderConfig) -> Path:
    path = Path(cfg.weights)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"encoder {cfg.id!r}: no transformers checkpoint (config.json) in {path}")
    return path


class HFImageEncoder(VisualEncoder):
    """A transformers image model applied per frame: SigLIP (vision tower), DINOv2 (with or without registers).

    CLS and register tokens are dropped; a full SigLIP/CLIP checkpoint contributes its vision tower only.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        from transformers import AutoModel

        path = _hf_config_dir(cfg)
        model = AutoModel.from_pretrained(path)
        self.model = getattr(model, "vision_model", model)  # SiglipModel / CLIPModel -> vision tower
        vcfg = getattr(model.config, "vision_config", model.config)
        if vcfg.image_size != cfg.image_size:
            raise ValueError(
                f"encoder {cfg.id!r}: config asks for {cfg.image_size}px but {path} is built for {vcfg.image_size}px"
            )
        has_cls = vcfg.model_type.startswith("dinov2") or vcfg.model_type.startswith("clip")
        self.prefix_tokens = int(has_cls) + int(getattr(vcfg, "num_register_tokens", 0) or 0)
        self.embed_dim = vcfg.hidden_size
        self.tokens_per_frame = (cfg.image_size // vcfg.patch_size) ** 2
        self.temporal_positions = cfg.num_frames
        self.mean, self.std = _hf_stats(path)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        tokens = self.model(pixel_values=video.flatten(0, 1)).last_hidden_state  # [B*T, prefix + N, C]
        return tokens[:, self.prefix_tokens :].unflatten(0, (b, t))  # [B, T, N, C]


class HFVideoEncoder(VisualEncoder):
    """A transformers video model with tubelet embeddings (ViViT, VideoMAE) loaded with ``from_pretrained``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        from transformers import AutoConfig, AutoModel

        path = _hf_config_dir(cfg)
        hf_cfg = AutoConfig.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path)
        tubelet = hf_cfg.tubelet_size
        t_step, patch = (tubelet[0], tubelet[1]) if isinstance(tubelet, list | tuple) else (tubelet, hf_cfg.patch_size)
        if hf_cfg.num_frames != cfg.num_frames or hf_cfg.image_size != cfg.image_size:
            raise ValueError(
                f"encoder {cfg.id!r}: config asks for {cfg.num_frames} frames at {cfg.image_size}px but the "
                f"checkpoint in {path} is built for {hf_cfg.num_frames} frames at {hf_cfg.image_size}px"
            )
        self.prefix_tokens = int(hf_cfg.model_type == "vivit")  # ViViT has a CLS token, VideoMAE none
        self.embed_dim = hf_cfg.hidden_size
        self.temporal_positions = cfg.num_frames // t_step
        self.tokens_per_frame = (cfg.image_size // patch) ** 2
        self.mean, self.std = _hf_stats(path)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values=video).last_hidden_state  # [B, (CLS) + T'*N, C], time-major
        tokens = tokens[:, self.prefix_tokens :]
        return tokens.unflatten(1, (self.temporal_positions, self.tokens_per_frame))  # [B, T', N, C]


ENCODERS: dict[str, type[VisualEncoder]] = {
    "timm_image": TimmImageEncoder,
    "hf_image": HFImageEncoder,
    "hf_video": HFVideoEncoder,
}


def build_encoder(cfg: EncoderConfig) -> VisualEncoder:
    if cfg.kind == "languagebind_video":
        from merv.models.languagebind import LanguageBindVideoEncoder

        return LanguageBindVideoEncoder(cfg)
    try:
        cls = ENCODERS[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown encoder kind {cfg.kind!r}; available: {sorted(ENCODERS)}") from None
    return cls(cfg)
