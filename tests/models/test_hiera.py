"""The video Hiera encoder: its contract, the views it cuts, and the folders it refuses (parity with the hiera package:
tests/models/test_reference_parity.py)."""

import json

import pytest
import torch

from merv.config import EncoderConfig
from merv.models.hiera import HieraVideoEncoder
from merv.models.standins import hiera_standin_config


def cfg(path, frames=32, size=64, **kw):
    return EncoderConfig(id="h", kind="hiera_video", weights=str(path), num_frames=frames, image_size=size, **kw)


@pytest.fixture
def folder(tmp_path):
    from hiera import Hiera

    torch.manual_seed(0)
    Hiera(**hiera_standin_config(64, 32)).save_pretrained(tmp_path / "h")
    return tmp_path / "h"


def test_contract_and_views(folder):
    enc = HieraVideoEncoder(cfg(folder)).eval()
    # 32 frames = two 16-frame views of 8 time steps (patch stride 2); 64 px / 4 / 2^3 = 2 x 2 tokens; 16 x 2^3 wide
    assert (enc.temporal_positions, enc.tokens_per_frame, enc.embed_dim, enc.clip_frames) == (16, 4, 128, 16)
    clip = torch.randn(1, 16, 3, 64, 64)
    with torch.no_grad():
        twice, once = enc(torch.cat([clip, clip], 1)), enc(clip)
    assert twice.shape == (1, 16, 4, 128) and once.shape == (1, 8, 4, 128)
    assert torch.allclose(twice[:, :8], once, atol=1e-6) and torch.allclose(twice[:, 8:], once, atol=1e-6)


def test_misfits_are_refused_naming_the_field(folder, tmp_path):
    with pytest.raises(ValueError, match="num_frames 24 is not a multiple of the 16-frame views"):
        HieraVideoEncoder(cfg(folder, frames=24))
    with pytest.raises(ValueError, match="asks for 96px but .* built for 64x64px"):
        HieraVideoEncoder(cfg(folder, size=96))
    with pytest.raises(ValueError, match="set feature_layer to null"):
        HieraVideoEncoder(cfg(folder, feature_layer=-2))
    image = tmp_path / "image"
    image.mkdir()
    (image / "config.json").write_text(json.dumps({"embed_dim": 16, "input_size": [64, 64]}))
    with pytest.raises(ValueError, match="is an image Hiera"):
        HieraVideoEncoder(cfg(image))


def test_every_tensor_must_fit(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "extra": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit the Hiera of its config.json: .*Unexpected key.*\"extra\""):
        HieraVideoEncoder(cfg(folder))
    del state["pos_embed_temporal"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"Missing key\(s\) in state_dict: \"pos_embed_temporal\""):
        HieraVideoEncoder(cfg(folder))
