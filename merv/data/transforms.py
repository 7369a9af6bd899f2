"""Frame preprocessing per encoder, as a function of the encoder's *config* alone.

The DataLoader workers, feature extraction, evaluation and serving all prepare frames with these functions, so
none of them needs a model instance. Shards store frames with their aspect ratio kept (short side = the shard
size); each encoder then takes its own frames from the shared stack and resizes them its own way:

- ``squash``: the whole frame resized to ``S x S`` (what SigLIP's processor does, and what the original MERV does for
  every encoder: its ``resize-naive`` strategy);
- ``crop``: the short side resized to ``floor(S / crop_pct)`` (the long side in proportion, rounded down), then the
  centre ``S x S``, its offset rounded as torchvision's ``CenterCrop`` does (timm's eval transform, LanguageBind's own
  video transform, ViViT's and DINOv2's transformers processors).

An encoder with ``hflip`` > 0 then mirrors the whole clip left-right with that probability, as LanguageBind's own
transform does (``RandomHorizontalFlipVideo(p=0.5)``, at evaluation too). The coin is drawn from a digest of the clip's
pixels instead of a global random state: the same clip gets the same flip in the loader workers, the feature cache,
evaluation and serving, and a rerun reproduces it; distinct clips are flipped independently with that probability.

``auto`` (the default) reads what the encoder's own processor does: timm's pretrained config of the architecture,
the ``preprocessor_config.json`` beside transformers weights, CLIP's constants for LanguageBind, Hiera's own for
Hiera. Frames are scaled to [0, 1] and normalised with the encoder's mean and std (ViViT's processor additionally
rescales to [-1, 1] before normalising; the original MERV, like merv, does not). Resizing is bilinear with
antialiasing for every encoder (LanguageBind's own transform resizes without it: the two agree exactly when the
stored frames' short side is already S, and differ slightly when they must be downscaled).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from merv.config import EncoderConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
HIERA_MEAN, HIERA_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How one encoder turns uint8 frames ``[T, H, W, 3]`` into its input ``[T, 3, S, S]``."""

    size: int
    resize: str  # "squash" | "crop"
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: float = 0.0

    @property
    def source_short_side(self) -> int:
        """The short side stored frames need so that this encoder never upsamples."""
        return self.size if self.resize == "squash" else math.floor(self.size / self.crop_pct)

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
        flip = self.hflip > 0 and clip_coin(x) < self.hflip
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # [T, 3, H, W]
        h, w = x.shape[-2:]
        if self.resize == "squash":
            if (h, w) != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        else:
            short = math.floor(self.size / self.crop_pct)
            th, tw = (short, max(short, w * short // h)) if h <= w else (max(short, h * short // w), short)
            if (h, w) != (th, tw):
                x = F.interpolate(x, size=(th, tw), mode="bilinear", antialias=True)
            top, left = round((th - self.size) / 2), round((tw - self.size) / 2)  # as torchvision's center_crop
            x = x[..., top : top + self.size, left : left + self.size]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        return (x.flip(-1) if flip else x).contiguous()


def clip_coin(frames: torch.Tensor) -> float:
    """A number in [0, 1) drawn from a digest of the uint8 clip: uniform over distinct clips, fixed for one clip."""
    digest = hashlib.blake2b(frames.contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _native(cfg: EncoderConfig, read_weights: bool = True) -> dict:
    """What the encoder's own processor does: ``{"resize", "crop_pct", "mean", "std"}`` (missing keys: unknown).
    Without ``read_weights`` nothing beside the weights is read (transformers encoders: unknown)."""
    if cfg.kind == "timm_image":
        import timm

        try:
            pcfg = timm.models.get_pretrained_cfg(cfg.arch)
        except Exception:  # an architecture timm has no pretrained config for
            pcfg = None
        if pcfg is None:
            return {}
        pcfg = pcfg.to_dict() if hasattr(pcfg, "to_dict") else dict(pcfg)
        return {"resize": "crop", "crop_pct": pcfg.get("crop_pct") or 1.0, "mean": pcfg["mean"], "std": pcfg["std"]}
    if cfg.kind == "languagebind_video":  # LanguageBind's video transform: short side to S, centre crop, CLIP's stats
        return {"resize": "crop", "crop_pct": 1.0, "mean": CLIP_MEAN, "std": CLIP_STD}
    if cfg.kind == "hiera_video":  # Hiera's own evaluation transform: resize to 256, centre crop 224, Kinetics stats
        return {"resize": "crop", "crop_pct": 224 / 256, "mean": HIERA_MEAN, "std": HIERA_STD}
    path = Path(cfg.weights) / "preprocessor_config.json"
    if not read_weights or not path.is_file():
        return {}
    proc = json.loads(path.read_text())
    out = {k: tuple(proc[f"image_{k}"]) for k in ("mean", "std") if f"image_{k}" in proc}
    size, crop = proc.get("size") or {}, proc.get("crop_size") or {}
    if proc.get("do_center_crop") and isinstance(size, dict) and size.get("shortest_edge") and crop.get("height"):
        out.update(resize="crop", crop_pct=crop["height"] / size["shortest_edge"])
    elif isinstance(size, dict) and size.get("height"):
        out["resize"] = "squash"
    return out


def with_preprocessing(cfg: EncoderConfig, read_weights: bool = True) -> EncoderConfig:
    """``cfg`` with ``resize``, ``crop_pct``, ``mean`` and ``std`` made explicit: what the config says, else the
    encoder's own processor (weights must already be resolved for transformers encoders), else squash and 0.5."""
    native = _native(cfg, read_weights)
    resize = cfg.resize if cfg.resize != "auto" else native.get("resize", "squash")
    crop_pct = cfg.crop_pct or (native.get("crop_pct", 1.0) if resize == "crop" else 1.0)
    mean = tuple(cfg.mean or native.get("mean", HALF))
    std = tuple(cfg.std or native.get("std", HALF))
    return dataclasses.replace(cfg, resize=resize, crop_pct=float(crop_pct), mean=mean, std=std)


def preprocess_for(cfg: EncoderConfig) -> Preprocess:
    """The transform of an encoder whose preprocessing is explicit (see :func:`with_preprocessing`)."""
    if cfg.resize == "auto" or cfg.mean is None or cfg.std is None:
        cfg = with_preprocessing(cfg)
    return Preprocess(cfg.image_size, cfg.resize, cfg.crop_pct or 1.0, tuple(cfg.mean), tuple(cfg.std), cfg.hflip)


def frame_size(encoders, read_weights: bool = True) -> int:
    """The short side to decode and store frames at so that no encoder upsamples (see ``Preprocess``).

    ``read_weights=False`` (the pipeline, before weights exist) reads no ``preprocessor_config.json``: a transformers
    encoder with ``resize: auto`` then counts as squashing; set ``resize`` explicitly to size shards for its crop."""
    return max(preprocess_for(with_preprocessing(e, read_weights)).source_short_side for e in encoders)


def frames_for(encoder: EncoderConfig, sample: dict) -> np.ndarray:
    """One encoder's own frames, picked from a decoded sample's shared frame stack (``[T_e, H, W, 3]`` uint8)."""
    positions = sample["meta"]["frame_positions"]
    key = str(encoder.num_frames)
    if key not in positions:
        raise ValueError(
            f"sample {sample['meta'].get('key')!r} was sharded for frame counts {sorted(positions)}, "
            f"but encoder {encoder.id!r} needs {encoder.num_frames}: reshard with that count"
        )
    return sample["frames"][positions[key]]


def video_inputs(encoders: tuple[EncoderConfig, ...], sample: dict) -> dict[str, torch.Tensor] | None:
    """Every encoder's input ``{encoder: [T_e, 3, S_e, S_e]}`` from a decoded sample; None for a text-only sample."""
    if sample.get("frames") is None:
        return None
    return {e.id: preprocess_for(e)(frames_for(e, sample)) for e in encoders}
