"""Frame preprocessing per encoder, from the encoder's config alone (no model instance)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from merv.config import EncoderConfig
from merv.data.transforms import CLIP_MEAN, Preprocess, preprocess_for, video_inputs, with_preprocessing


def enc(**kw) -> EncoderConfig:
    base = {"id": "e", "kind": "timm_image", "arch": "vit_base_patch16_siglip_224", "weights": "x", "num_frames": 2}
    return EncoderConfig(**{**base, "image_size": 8, **kw})


def frames(h: int, w: int) -> np.ndarray:
    """Two frames whose pixel values are their column index (so the kept columns show where a crop was taken)."""
    row = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    return np.repeat(np.stack([row, row])[..., None], 3, axis=-1)


def test_squash_keeps_the_whole_frame_and_normalises():
    out = Preprocess(4, "squash", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(frames(6, 12))
    assert out.shape == (2, 3, 4, 4)
    assert out[0, 0, 0, 0] < 2 / 255 and out[0, 0, 0, -1] > 9 / 255, "left and right edges of the frame survive"
    norm = Preprocess(4, "squash", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(np.full((1, 4, 4, 3), 255, np.uint8))
    assert torch.allclose(norm, torch.ones(1, 3, 4, 4))


def test_crop_resizes_the_short_side_then_takes_the_centre():
    # 8 x 16 frame, size 4, crop_pct 0.5: short side -> 8 (no resize), long side 16, centre 4 x 4: columns 6..9
    out = Preprocess(4, "crop", 0.5, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(frames(8, 16))
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[0, 0, 0] * 255, torch.tensor([6.0, 7.0, 8.0, 9.0]))
    tall = Preprocess(4, "crop", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(frames(16, 8).transpose(0, 2, 1, 3))
    assert tall.shape == (2, 3, 4, 4)
    assert Preprocess(224, "crop", 0.875, CLIP_MEAN, CLIP_MEAN).source_short_side == 256


def test_auto_reads_each_encoders_own_processor(tmp_path):
    import timm

    dino = with_preprocessing(enc(arch="vit_large_patch14_reg4_dinov2.lvd142m", image_size=224))
    pcfg = timm.models.get_pretrained_cfg("vit_large_patch14_reg4_dinov2.lvd142m").to_dict()
    assert (dino.resize, dino.crop_pct, dino.mean) == ("crop", pcfg["crop_pct"], tuple(pcfg["mean"]))
    lb = with_preprocessing(enc(kind="languagebind_video", arch=None))
    assert (lb.resize, lb.crop_pct, lb.mean) == ("crop", 1.0, CLIP_MEAN)
    # a transformers ViViT folder: shortest edge 256, centre crop 224 -> crop_pct 0.875
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_center_crop": True,
                "size": {"shortest_edge": 256},
                "crop_size": {"height": 224, "width": 224},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            }
        )
    )
    vivit = with_preprocessing(enc(kind="hf_video", arch="vivit", weights=str(tmp_path)))
    assert (vivit.resize, vivit.crop_pct, vivit.std) == ("crop", 0.875, (0.5, 0.5, 0.5))
    # what the config says wins (the paper presets squash, as the original's resize-naive)
    squashed = with_preprocessing(dataclasses.replace(vivit, resize="squash", mean=(0.1, 0.2, 0.3)))
    assert (squashed.resize, squashed.mean, squashed.std) == ("squash", (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))


def test_video_inputs_pick_each_encoders_frames():
    a, b = enc(id="a", num_frames=2), enc(id="b", num_frames=4, resize="squash", mean=(0, 0, 0), std=(1, 1, 1))
    stack = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((4, 8, 8, 3), np.uint8) * 10
    sample = {"frames": stack, "meta": {"key": "k", "frame_positions": {"2": [1, 3], "4": [0, 1, 2, 3]}}}
    out = video_inputs((a, b), sample)
    assert out["a"].shape == (2, 3, 8, 8) and out["b"].shape == (4, 3, 8, 8)
    assert torch.allclose(out["b"][:, 0, 0, 0] * 255, torch.tensor([0.0, 10.0, 20.0, 30.0]))
    assert video_inputs((a,), {"frames": None, "meta": {}}) is None, "a text-only sample has no video"
    with pytest.raises(ValueError, match="encoder 'c' needs 3: reshard"):
        video_inputs((enc(id="c", num_frames=3),), sample)
    assert preprocess_for(b).resize == "squash"


def original_languagebind_transform(frames: np.ndarray, flip: bool) -> torch.Tensor:
    """LanguageBind's video transform as the original MERV composes it (its processing_video.get_video_transform):
    /255, NormalizeVideo(CLIP), ShortSideScale(224) (long side floor(long / short * 224), bilinear), CenterCropVideo
    (224), RandomHorizontalFlipVideo -- torchvision's own video transforms, on a [C, T, H, W] clip."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchvision.transforms._transforms_video import CenterCropVideo, NormalizeVideo, RandomHorizontalFlipVideo

    from merv.data.transforms import CLIP_STD

    x = torch.as_tensor(frames).permute(3, 0, 1, 2).float() / 255.0  # [C, T, H, W]
    x = NormalizeVideo(CLIP_MEAN, CLIP_STD)(x)
    c, t, h, w = x.shape
    size = (int(h / w * 224), 224) if w < h else (224, int(w / h * 224))
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x = CenterCropVideo(224)(x)
    x = RandomHorizontalFlipVideo(p=1.0 if flip else 0.0)(x)
    return x.permute(1, 0, 2, 3)  # [T, C, H, W] as merv returns it


@pytest.mark.parametrize("width", [299, 300, 224])
def test_languagebind_frames_as_the_original_prepares_them(width):
    """Frames whose short side is already 224 (what merv's shards store for it): merv's crop, CLIP statistics and
    flip give LanguageBind's own transform's tensor, for odd and even margins and with and without the flip."""
    from merv.config import resolve_run_config

    lb = next(e for e in resolve_run_config("merv-frozen").model.encoders if e.kind == "languagebind_video")
    clip = np.random.default_rng(width).integers(0, 256, (4, 224, width, 3), dtype=np.uint8)
    for hflip in (0.0, 1.0):
        ours = preprocess_for(dataclasses.replace(lb, hflip=hflip))(clip)
        expected = original_languagebind_transform(clip, flip=hflip == 1.0)
        assert ours.shape == expected.shape == (4, 3, 224, 224)
        assert (ours - expected).abs().max() < 1e-5, (width, hflip)


def test_the_flip_is_a_per_clip_coin_with_its_probability():
    """hflip 0.5: about half of distinct clips are mirrored (all their frames together), the same clip always the same
    way; hflip 0 never flips."""
    flip = Preprocess(8, "squash", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), hflip=0.5)
    keep = dataclasses.replace(flip, hflip=0.0)
    rng = np.random.default_rng(0)
    flipped = 0
    for _ in range(200):
        clip = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
        out, plain = flip(clip), keep(clip)
        assert torch.equal(flip(clip), out), "the same clip gets the same coin"
        if torch.equal(out, plain.flip(-1)) and not torch.equal(out, plain):
            flipped += 1
        else:
            assert torch.equal(out, plain)
    assert 70 <= flipped <= 130, flipped  # 200 fair coins: 100 +- 4.2 sigma
    with pytest.raises(ValueError, match="hflip is a probability"):
        enc(hflip=1.5)
