"""Frozen visual encoders behind one contract (:class:`merv.models.backbone.VisualEncoder`), and the registry that
builds one from its config (:func:`build_encoder`).

Every encoder takes ``video [B, T, 3, S, S]`` (its own T and S, prepared by :mod:`merv.data.transforms` from its
config) and returns features ``[B, T', N, C]``: T' temporal positions of N spatial tokens of width C, taken from the
layer the config's ``feature_layer`` names (the original MERV takes the penultimate block of LanguageBind, DINOv2 and
SigLIP, ViViT's final output). Prefix tokens (CLS, registers) are dropped, since MERV's projectors pool over the patch
grid. Blocks after the feature layer are removed at build time: they would be computed for nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from merv.config import EncoderConfig
from merv.models.backbone import VisualEncoder, layer_index


class StemBatchNorm(nn.BatchNorm2d):
    """Batch norm whose statistics follow the input's dtype once frozen (eval mode): a frozen encoder under FSDP2's
    bf16 policy or autocast holds bf16 parameters beside fp32 running statistics, which ``batch_norm`` refuses to mix.
    In fp32 it is ``nn.BatchNorm2d`` exactly; the state dict is the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)

        def cast(t):
            return None if t is None else t.to(x.dtype)

        stats = (cast(self.running_mean), cast(self.running_var), cast(self.weight), cast(self.bias))
        return nn.functional.batch_norm(x, *stats, False, 0.0, self.eps)


def conv_stem_patch_embed():
    """timm's ``PatchEmbed`` with a convolutional stem instead of one strided projection: 3x3 stride-2 convolutions
    (batch norm, ReLU) down to the patch size, then a 1x1 to the embedding width, the stem of "Early Convolutions
    Help Transformers See Better" (Xiao et al., 2021). Same tokens, same grid; what a tiny ViT needs to learn shape
    from a few thousand steps (a plain 16x16 projection learned none of it: docs/thesis.md)."""
    import math

    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stride, width = self.patch_size[0], self.proj.out_channels
            steps = int(math.log2(stride))
            if 2**steps != stride or self.patch_size[0] != self.patch_size[1]:
                raise ValueError(f"a convolutional stem needs a square power-of-two patch size, got {self.patch_size}")
            layers, channels = [], self.proj.in_channels
            for i in range(steps):  # widths ..., width/4, width/2, width: doubling as the resolution halves
                out = max(8, width >> (steps - 1 - i))
                layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), StemBatchNorm(out), nn.ReLU(inplace=True)]
                channels = out
            self.proj = nn.Sequential(*layers, nn.Conv2d(channels, width, 1))

    return ConvStemPatchEmbed


# ``model_kwargs: {embed_layer: <name>}`` of a timm ViT: a patch embedding by name (YAML cannot hold a class)
EMBED_LAYERS = {"conv_stem": conv_stem_patch_embed}


def timm_kwargs(cfg: EncoderConfig) -> dict:
    """``cfg.model_kwargs`` as timm's ``create_model`` takes them (a named ``embed_layer`` resolved to its class)."""
    kwargs = dict(cfg.model_kwargs)
    if "embed_layer" in kwargs:
        name = kwargs["embed_layer"]
        if name not in EMBED_LAYERS:
            raise ValueError(f"encoder {cfg.id!r}: unknown embed_layer {name!r}; known: {sorted(EMBED_LAYERS)}")
        kwargs["embed_layer"] = EMBED_LAYERS[name]()
    return kwargs


class TimmImageEncoder(VisualEncoder):
    """Any timm vision transformer applied to each frame independently (SigLIP, DINOv2, ViT ...)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        import timm

        from merv.integrity import IntegrityError, check_finite, check_header, check_names

        path = Path(cfg.weights)
        if not path.is_file():
            raise FileNotFoundError(f"encoder {cfg.id!r}: weights file {path} not found")
        # The path real checkpoints take: timm's pretrained loader pointed at the local file, which adapts a hub
        # checkpoint to the model (position embeddings resampled to the image size, the classifier dropped) and
        # loads it strictly. Around it, merv.integrity: an intact header before any data, all values finite after.
        what = f"encoder {cfg.id!r}"
        try:
            check_header(path)
        except IntegrityError as e:
            raise IntegrityError(f"{what}: {e}") from None
        try:
            self.model = timm.create_model(
                cfg.arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0, **timm_kwargs(cfg)
            )
        except RuntimeError as e:  # torch's load_state_dict: misshapen tensors
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip()) or str(e)
            raise IntegrityError(f"{what}: {path}: {detail}") from None
        # timm loads non-strictly once the classifier differs (num_classes=0): check the names against the header
        # (timm hub files and merv's own are in timm's layout; only a classifier may be left over)
        classifier = self.model.pretrained_cfg.get("classifier") or ()
        heads = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
        check_names(path, set(self.model.state_dict()), what, allow_unexpected=heads)
        check_finite(self.model.state_dict(), f"{what} ({path})")
        if cfg.feature_layer is not None:
            if not hasattr(self.model, "blocks"):
                raise ValueError(f"encoder {cfg.id!r}: feature_layer needs a timm vision transformer (with blocks)")
            keep = layer_index(cfg.feature_layer, len(self.model.blocks), cfg.id)
            self.model.blocks = self.model.blocks[:keep]  # forward_features then ends at hidden_states[keep] ...
            self.model.norm = nn.Identity()  # ... without the final norm (as timm's get_intermediate_layers)
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


def _hf_config_dir(cfg: EncoderConfig) -> Path:
    path = Path(cfg.weights)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"encoder {cfg.id!r}: no transformers checkpoint (config.json) in {path}")
    return path


# What a transformers backbone may lack or leave unused from its checkpoint: the pooler (merv reads hidden states,
# never the pooled output; a classification checkpoint has none) and a classification head (google's ViViT ships
# VivitForVideoClassification). Everything else must be consumed exactly (merv.integrity.check_pretrained).
UNUSED_MISSING = ("pooler.",)
UNUSED_EXTRA = ("classifier.",)


def _hf_pretrained(path: Path, cfg: EncoderConfig) -> nn.Module:
    from transformers import AutoModel

    from merv.integrity import check_pretrained

    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    check_pretrained(model, info, path, f"encoder {cfg.id!r}", allow_missing=UNUSED_MISSING,
                     allow_unexpected=UNUSED_EXTRA)  # fmt: skip
    return model


def _hf_features(model: nn.Module, cfg: EncoderConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """``last_hidden_state``, or ``hidden_states[feature_layer]`` (0: embeddings, i: block i's output)."""
    if cfg.feature_layer is None:
        return model(pixel_values=pixel_values).last_hidden_state
    hidden = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return hidden[layer_index(cfg.feature_layer, len(hidden) - 1, cfg.id)]


class HFImageEncoder(VisualEncoder):
    """A transformers image model applied per frame: SigLIP (vision tower), DINOv2 (with or without registers).

    CLS and register tokens are dropped; a full SigLIP/CLIP checkpoint contributes its vision tower only.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        path = _hf_config_dir(cfg)
        model = _hf_pretrained(path, cfg)
        self.model = getattr(model, "vision_model", model)  # SiglipModel / CLIPModel -> vision tower
        vcfg = getattr(model.config, "vision_config", model.config)
        if vcfg.image_size != cfg.image_size:
            raise ValueError(
                f"encoder {cfg.id!r}: config asks for {cfg.image_size}px but {path} is built for {vcfg.image_size}px"
            )
        if cfg.feature_layer is not None:
            layer_index(cfg.feature_layer, vcfg.num_hidden_layers, cfg.id)  # checked here, not at the first batch
        has_cls = vcfg.model_type.startswith("dinov2") or vcfg.model_type.startswith("clip")
        self.prefix_tokens = int(has_cls) + int(getattr(vcfg, "num_register_tokens", 0) or 0)
        self.embed_dim = vcfg.hidden_size
        self.tokens_per_frame = (cfg.image_size // vcfg.patch_size) ** 2
        self.temporal_positions = cfg.num_frames

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        tokens = _hf_features(self.model, self.cfg, video.flatten(0, 1))  # [B*T, prefix + N, C]
        return tokens[:, self.prefix_tokens :].unflatten(0, (b, t))  # [B, T, N, C]


class HFVideoEncoder(VisualEncoder):
    """A transformers video model with tubelet embeddings (ViViT, VideoMAE) loaded with ``from_pretrained``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        from transformers import AutoConfig

        path = _hf_config_dir(cfg)
        hf_cfg = AutoConfig.from_pretrained(path)
        self.model = _hf_pretrained(path, cfg)
        tubelet = hf_cfg.tubelet_size
        t_step, patch = (tubelet[0], tubelet[1]) if isinstance(tubelet, list | tuple) else (tubelet, hf_cfg.patch_size)
        if hf_cfg.num_frames != cfg.num_frames or hf_cfg.image_size != cfg.image_size:
            raise ValueError(
                f"encoder {cfg.id!r}: config asks for {cfg.num_frames} frames at {cfg.image_size}px but the "
                f"checkpoint in {path} is built for {hf_cfg.num_frames} frames at {hf_cfg.image_size}px"
            )
        if cfg.feature_layer is not None:
            layer_index(cfg.feature_layer, hf_cfg.num_hidden_layers, cfg.id)
        self.prefix_tokens = int(hf_cfg.model_type == "vivit")  # ViViT has a CLS token, VideoMAE none
        self.embed_dim = hf_cfg.hidden_size
        self.temporal_positions = cfg.num_frames // t_step
        self.tokens_per_frame = (cfg.image_size // patch) ** 2

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tokens = _hf_features(self.model, self.cfg, video)  # [B, (CLS) + T'*N, C], time-major
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
    if cfg.kind == "hiera_video":  # the hiera package is an optional extra
        from merv.models.hiera import HieraVideoEncoder

        return HieraVideoEncoder(cfg)
    try:
        cls = ENCODERS[cfg.kind]
    except KeyError:
        kinds = sorted([*ENCODERS, "languagebind_video", "hiera_video"])
        raise ValueError(f"unknown encoder kind {cfg.kind!r}; available: {kinds}") from None
    return cls(cfg)
