"""merv's encoders against implementations nobody here wrote, on small random models with the real checkpoints'
layouts. Each function builds the model with the reference implementation, saves it the way its hub checkpoint is
saved, loads that folder or file through merv's encoder, and returns the max abs difference of the features the
original MERV takes (``tests/models/test_reference_parity.py`` asserts them, ``benchmarks/encoder_parity.py`` prints
them):

- LanguageBind-Video: LanguageBind's own code (PyPI ``languagebind``, in its venv), ``hidden_states[-2]`` per frame
  without CLS, a video of T frames fed as the original MERV feeds it (16 frames into the 8-frame model: two clips);
- ViViT: transformers' ``VivitModel``, ``last_hidden_state[:, 1:]``, from a ``VivitForVideoClassification`` folder
  (the class of ``google/vivit-b-16x2-kinetics400``);
- DINOv2 (with registers) and SigLIP: timm's ``get_intermediate_layers(n={len(blocks) - 2})`` (penultimate block, no
  final norm, prefix tokens dropped), the model created at 224-like size from a checkpoint of another size as the
  original creates DINOv2 at 224 from its 518 checkpoint;
- Hiera (video): the ``hiera`` package (PyPI ``hiera-transformer``), ``forward(..., return_intermediates=True)[1][-1]``
  on views of 16 frames, as the original's Hiera backbone takes it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from merv.config import EncoderConfig
from merv.models.encoders import build_encoder

HERE = Path(__file__).resolve().parent

# LanguageBind_Video_merge's layout (CLIP ViT-L/14 vision tower with temporal attention, 8-frame clips; CLIP text
# tower), scaled down: the fields of tests/data/hub/LanguageBind_Video_merge/config.json, smaller.
LANGUAGEBIND_SMALL = {
    "projection_dim": 32,
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "vocab_size": 99, "max_position_embeddings": 16},
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "image_size": 56, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                      "add_time_attn": True, "num_frames": 8, "lora_r": 0, "force_patch_dropout": 0.0},
}  # fmt: skip


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def languagebind(python: Path, tmp: Path, frame_counts=(8, 16), seed: int = 0) -> dict[int, float]:
    """{frames: max abs diff} of merv's LanguageBind encoder against LanguageBind's code on the same folder."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(LANGUAGEBIND_SMALL))
    folder = tmp / "LanguageBind_Video_small"
    torch.manual_seed(seed)
    args = []
    for frames in frame_counts:
        torch.save(torch.randn(2, frames, 3, 56, 56), tmp / f"video{frames}.pt")
        args += [str(tmp / f"video{frames}.pt"), str(tmp / f"hidden{frames}.pt")]
    script = HERE / "languagebind_reference.py"
    subprocess.run([str(python), str(script), "features", str(tmp / "config.json"), str(seed), str(folder), *args],
                   check=True, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = {}
    for frames in frame_counts:
        cfg = EncoderConfig(id="languagebind", kind="languagebind_video", weights=str(folder), num_frames=frames,
                            image_size=56, feature_layer=-2)  # fmt: skip
        encoder = build_encoder(cfg).eval()
        with torch.no_grad():
            ours = encoder(torch.load(tmp / f"video{frames}.pt"))
        out[frames] = max_abs_diff(ours, torch.load(tmp / f"hidden{frames}.pt"))
    return out


def languagebind_manifest(python: Path, config: Path, out: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor LanguageBind's code saves for ``config`` (built on the meta device)."""
    script = HERE / "languagebind_reference.py"
    subprocess.run([str(python), str(script), "manifest", str(config), str(out)], check=True, capture_output=True,
                   text=True, timeout=300)  # fmt: skip
    return json.loads(out.read_text())


def vivit(tmp: Path, seed: int = 0) -> float:
    from transformers import VivitConfig, VivitForVideoClassification, VivitModel

    torch.manual_seed(seed)
    config = VivitConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                         num_frames=8, image_size=32, tubelet_size=[2, 16, 16], hidden_act="gelu_fast",
                         layer_norm_eps=1e-6, num_labels=5)  # fmt: skip
    VivitForVideoClassification(config).save_pretrained(tmp / "vivit")
    reference = VivitModel.from_pretrained(tmp / "vivit").eval()
    cfg = EncoderConfig(id="vivit", kind="hf_video", arch="vivit", weights=str(tmp / "vivit"), num_frames=8,
                        image_size=32)  # fmt: skip
    encoder = build_encoder(cfg).eval()
    video = torch.randn(2, 8, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=video).last_hidden_state[:, 1:]  # the original: CLS dropped
        ours = encoder(video).flatten(1, 2)  # [B, T'*N, C], time-major as the original reshapes it
    return max_abs_diff(ours, expected)


def timm_penultimate(arch: str, tmp: Path, native: int, size: int, seed: int = 0, **arch_kwargs) -> float:
    """A timm ViT saved at ``native`` px, created at ``size`` px by merv and by the original's call."""
    import timm

    from merv.models.tiny import save_module

    torch.manual_seed(seed)
    file = tmp / f"{arch}.safetensors"
    save_module(timm.create_model(arch, pretrained=False, num_classes=0, img_size=native, **arch_kwargs), file)
    kwargs = {"img_size": size, **arch_kwargs}
    reference = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, num_classes=0,
                                  **kwargs).eval()  # fmt: skip
    cfg = EncoderConfig(id="e", kind="timm_image", arch=arch, weights=str(file), num_frames=3, image_size=size,
                        model_kwargs=kwargs, feature_layer=-2)  # fmt: skip
    encoder = build_encoder(cfg).eval()
    video = torch.randn(2, 3, 3, size, size)
    with torch.no_grad():
        (expected,) = reference.get_intermediate_layers(video.flatten(0, 1), n={len(reference.blocks) - 2})
        ours = encoder(video).flatten(0, 1)
    return max_abs_diff(ours, expected)


def dinov2(tmp: Path) -> float:
    return timm_penultimate("vit_large_patch14_reg4_dinov2.lvd142m", tmp, native=70, size=56, embed_dim=64, depth=3,
                            num_heads=4)  # fmt: skip


def siglip(tmp: Path) -> float:
    return timm_penultimate("vit_base_patch16_siglip_224", tmp, native=48, size=32, embed_dim=64, depth=3,
                            num_heads=4)  # fmt: skip


# hiera_base_plus_16x224's video layout (hiera-transformer 0.1.4), scaled down: 16-frame views, 4 stages
HIERA_SMALL = {
    "input_size": [16, 64, 64], "q_stride": [1, 2, 2], "mask_unit_size": [1, 8, 8], "patch_kernel": [3, 7, 7],
    "patch_stride": [2, 4, 4], "patch_padding": [1, 3, 3], "sep_pos_embed": True, "embed_dim": 16, "num_heads": 1,
    "stages": [1, 2, 3, 1], "num_classes": 10,
}  # fmt: skip


def hiera(tmp: Path, frames: int = 32, seed: int = 0) -> float:
    """The original's rule on the hiera package's model: views of 16 frames, last stage's intermediate, in order."""
    from hiera import Hiera

    torch.manual_seed(seed)
    Hiera(**HIERA_SMALL).save_pretrained(tmp / "hiera")
    reference = Hiera.from_pretrained(tmp / "hiera").eval()  # how the original loads its hub checkpoints
    cfg = EncoderConfig(id="hiera", kind="hiera_video", weights=str(tmp / "hiera"), num_frames=frames, image_size=64)
    encoder = build_encoder(cfg).eval()
    video = torch.randn(2, frames, 3, 64, 64)  # [B, F, C, H, W]
    b, f, c, h, w = video.shape
    with torch.no_grad():
        views = video.reshape(-1, 16, c, h, w).permute(0, 2, 1, 3, 4).contiguous()
        expected = reference(views, return_intermediates=True)[1][-1]
        expected = expected.reshape(b, -1, expected.shape[-1])  # [B, views x T' x H' x W', C]
        ours = encoder(video).flatten(1, 2)
    return max_abs_diff(ours, expected)
