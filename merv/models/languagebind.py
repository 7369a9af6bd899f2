"""LanguageBind-Video as a merv encoder: a CLIP ViT whose every layer first attends over time.

LanguageBind's video tower is transformers' CLIP vision transformer with, in each encoder layer and before the usual
spatial block, a temporal block: a learned per-frame position embedding is added to every token, then each token
attends to itself across the frames (its own pre-norm and CLIP attention, residual). This module builds that from a
LanguageBind folder (``config.json`` with ``vision_config.add_time_attn`` and ``num_frames``; weights in
``model.safetensors`` or ``pytorch_model.bin``), reusing transformers' CLIP layers for the spatial part. Every vision
weight of the checkpoint must be consumed: a folder that does not fit fails loudly instead of silently dropping the
temporal layers. The text tower and projections of the checkpoint are not needed and are ignored, and so is the
``position_ids`` buffer that folders saved with transformers 4.x carry (a constant ``arange``, not a weight).

The temporal embedding has ``vision_config.num_frames`` positions (8 for ``LanguageBind_Video_merge``): that is the
clip length. LanguageBind's code folds frames into clips of that length, so a video of T frames runs as T / clip
clips, each attending over its own frames with temporal positions 0..clip-1; the original MERV feeds its 8-frame
checkpoint 16 frames that way (two clips of 8). merv does the same, so T must be a multiple of the clip length.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from merv.config import EncoderConfig
from merv.models.encoders import VisualEncoder, layer_index

_TEMPORAL = re.compile(
    r"^vision_model\.encoder\.layers\.(\d+)\.(temporal_embedding|temporal_attn|temporal_layer_norm1)(.*)$"
)
_OURS = {"temporal_embedding": "embedding", "temporal_attn": "attn", "temporal_layer_norm1": "norm"}
_THEIRS = {v: k for k, v in _OURS.items()}
# Buffers a checkpoint may carry that are not weights: transformers 4.x saved CLIP's position ids (LanguageBind's own
# CLIPVisionEmbeddings registers them as persistent); transformers 5 keeps them out of the state dict.
_BUFFERS = ("vision.embeddings.position_ids",)


class TemporalBlock(nn.Module):
    """x + pos_t, then x + Attention_over_time(LayerNorm(x)) for every token position."""

    def __init__(self, vision_config, num_frames: int):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPAttention

        self.embedding = nn.Parameter(torch.zeros(1, num_frames, vision_config.hidden_size))
        nn.init.normal_(self.embedding, std=vision_config.hidden_size**-0.5)
        self.norm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.attn = CLIPAttention(vision_config)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bt, n, d = x.shape
        x = x.view(bt // frames, frames, n, d).transpose(1, 2) + self.embedding[:, :frames]  # [B, N, T, D]
        seq = x.reshape(-1, frames, d)  # every token position attends over time
        seq = seq + self.attn(hidden_states=self.norm(seq))[0]
        return seq.view(bt // frames, n, frames, d).transpose(1, 2).reshape(bt, n, d)


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


def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LanguageBind key names -> this module's (``vision.*`` spatial CLIP, ``temporal.<i>.*``); text side dropped."""
    out = {}
    for key, value in state.items():
        m = _TEMPORAL.match(key)
        if m:
            out[f"temporal.{m[1]}.{_OURS[m[2]]}{m[3]}"] = value
        elif key.startswith("vision_model."):
            out["vision." + key[len("vision_model.") :]] = value
    return out


def to_theirs(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_ours` (used to write stand-in checkpoints in LanguageBind's layout)."""
    out = {}
    for key, value in state.items():
        if key.startswith("temporal."):
            _, index, part, rest = re.match(r"^(temporal)\.(\d+)\.(embedding|attn|norm)(.*)$", key).groups()
            out[f"vision_model.encoder.layers.{index}.{_THEIRS[part]}{rest}"] = value
        elif key.startswith("vision."):
            out["vision_model." + key[len("vision.") :]] = value
    return out


class LanguageBindVideoEncoder(VisualEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        from transformers import CLIPVisionConfig, CLIPVisionModel

        path = Path(cfg.weights)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"encoder {cfg.id!r}: no LanguageBind config.json in {path}")
        raw = json.loads((path / "config.json").read_text())
        vision = raw.get("vision_config", raw)
        if not vision.get("add_time_attn"):
            raise ValueError(f"encoder {cfg.id!r}: {path} is not a LanguageBind-Video folder (no add_time_attn)")
        clip = vision.get("num_frames")
        if not isinstance(clip, int) or clip < 1 or vision.get("image_size") != cfg.image_size:
            raise ValueError(
                f"encoder {cfg.id!r}: config asks for {cfg.image_size}px but {path} is built for "
                f"{vision.get('image_size')}px (vision_config.num_frames: {clip!r})"
            )
        if cfg.num_frames % clip:
            raise ValueError(
                f"encoder {cfg.id!r}: num_frames {cfg.num_frames} is not a multiple of the {clip}-frame clips {path} "
                f"is built for (LanguageBind runs a video as clips of {clip} frames, each with temporal positions "
                f"0-{clip - 1}): use {clip}, {2 * clip}, ..."
            )
        known = CLIPVisionConfig().to_dict()
        vcfg = CLIPVisionConfig(**{k: v for k, v in vision.items() if k in known and k != "model_type"})
        self.vision = CLIPVisionModel(vcfg)
        self.temporal = nn.ModuleList(TemporalBlock(vcfg, clip) for _ in range(vcfg.num_hidden_layers))
        self.clip_frames = clip
        self._load(to_ours(read_checkpoint(path)), f"encoder {cfg.id!r}: {path}")
        if cfg.feature_layer is not None:  # MERV takes hidden_states[-2]: the last block is never needed
            keep = layer_index(cfg.feature_layer, vcfg.num_hidden_layers, cfg.id)
            self.vision.encoder.layers = self.vision.encoder.layers[:keep]
            self.temporal = self.temporal[:keep]
        self.embed_dim = vcfg.hidden_size
        self.prefix_tokens = 1  # CLS
        self.temporal_positions = cfg.num_frames
        self.tokens_per_frame = (cfg.image_size // vcfg.patch_size) ** 2

    def _load(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load the vision weights strictly: every tensor this tower has, with its shape, and nothing else besides the
        known non-weight buffers (:data:`_BUFFERS`)."""
        own = self.state_dict()
        for key in _BUFFERS:
            if key in state and key not in own:
                state = {k: v for k, v in state.items() if k != key}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]  # fmt: skip
        if missing or unexpected or shapes:
            raise ValueError(
                f"{where} does not fit a LanguageBind-Video tower: missing {missing[:4]}, unexpected {unexpected[:4]}"
                + (f", shapes {shapes[:4]}" if shapes else "")
            )
        self.load_state_dict(state)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Frames -> ``hidden_states[feature_layer]`` (the last block's output when it is None), CLS dropped. A video
        longer than the checkpoint's clip runs as consecutive clips, as LanguageBind's own code runs it."""
        b, t = video.shape[:2]
        x = self.vision.pre_layrnorm(self.vision.embeddings(video.flatten(0, 1)))  # [B*T, 1 + N, D]
        for layer, temporal in zip(self.vision.encoder.layers, self.temporal, strict=True):
            x = temporal(x, self.clip_frames)  # [B*T/clip clips of clip frames]
            x = x + layer.self_attn(hidden_states=layer.layer_norm1(x))[0]
            x = x + layer.mlp(layer.layer_norm2(x))
        return x[:, self.prefix_tokens :].unflatten(0, (b, t))  # CLS dropped: [B, T, N, D]


SIZES = {
    "toy": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "large": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
}


def write_standin(folder: Path, image_size: int, num_frames: int, patch_size: int = 14, size: str = "toy") -> None:
    """A LanguageBind-Video folder with random weights in LanguageBind's own layout (config.json +
    model.safetensors, with the ``position_ids`` buffer transformers 4.x saves): ``toy`` for tests, ``large``
    (ViT-L/14, the real size) for benchmarks. ``num_frames`` is the checkpoint's clip length (the real one's is 8)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = {
        **SIZES[size],
        "image_size": image_size,
        "patch_size": patch_size,
        "num_frames": num_frames,
        "add_time_attn": True,
    }
    vcfg = CLIPVisionConfig(**{k: v for k, v in vision.items() if k not in ("num_frames", "add_time_attn")})
    parts = nn.Module()
    parts.vision = CLIPVisionModel(vcfg)
    parts.temporal = nn.ModuleList(TemporalBlock(vcfg, num_frames) for _ in range(vcfg.num_hidden_layers))
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in to_theirs(parts.state_dict()).items()}
    state["vision_model.embeddings.position_ids"] = torch.arange((image_size // patch_size) ** 2 + 1).unsqueeze(0)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "LanguageBindVideo", "vision_config": vision}))
