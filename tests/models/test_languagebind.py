"""LanguageBind-Video: loads from LanguageBind's own checkpoint layout, uses its temporal layers, refuses misfits."""

import json

import pytest
import torch

from merv.config import EncoderConfig
from merv.models.languagebind import LanguageBindVideoEncoder, read_checkpoint, write_standin


def cfg(path, frames=4, size=28):
    return EncoderConfig(id="lb", kind="languagebind_video", weights=str(path), num_frames=frames, image_size=size)


@pytest.fixture
def folder(tmp_path):
    write_standin(tmp_path / "lb", image_size=28, num_frames=4)
    return tmp_path / "lb"


def test_contract_and_shapes(folder):
    enc = LanguageBindVideoEncoder(cfg(folder))
    assert (enc.embed_dim, enc.temporal_positions, enc.tokens_per_frame) == (32, 4, 4)
    out = enc(enc.transform(torch.randint(0, 255, (4, 28, 28, 3), dtype=torch.uint8).numpy()).unsqueeze(0))
    assert out.shape == (1, 4, 4, 32)


def test_every_vision_weight_is_used(folder):
    enc = LanguageBindVideoEncoder(cfg(folder))
    state = read_checkpoint(folder)
    assert any(".temporal_attn." in k for k in state) and any(".temporal_embedding" in k for k in state)
    loaded = enc.state_dict()
    assert torch.equal(loaded["temporal.1.embedding"], state["vision_model.encoder.layers.1.temporal_embedding"])


def test_frames_attend_to_each_other(folder):
    torch.manual_seed(0)
    enc = LanguageBindVideoEncoder(cfg(folder)).eval()
    video = torch.randn(1, 4, 3, 28, 28)
    changed = video.clone()
    changed[:, 0] += 1.0
    with torch.no_grad():
        a, b = enc(video), enc(changed)
    assert (a[:, 3] - b[:, 3]).abs().max() > 1e-4, "frame 3's tokens see frame 0 through temporal attention"


def test_a_folder_without_temporal_layers_is_refused(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if "temporal" not in k}
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit a LanguageBind-Video tower: missing \['temporal"):
        LanguageBindVideoEncoder(cfg(folder))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"vision_config": {"image_size": 28}}))
    with pytest.raises(ValueError, match="not a LanguageBind-Video folder"):
        LanguageBindVideoEncoder(cfg(tmp_path / "clip"))


def test_frame_count_must_match(folder):
    with pytest.raises(ValueError, match="asks for 8 frames at 28px but .* built for 4 frames"):
        LanguageBindVideoEncoder(cfg(folder, frames=8))
