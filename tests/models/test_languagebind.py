"""LanguageBind-Video: loads from LanguageBind's own checkpoint layout, uses its temporal layers, refuses misfits."""

import json

import pytest
import torch

from merv.config import EncoderConfig
from merv.models.backbone import read_checkpoint
from merv.models.languagebind import LanguageBindVideoEncoder, write_standin


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


def test_frames_run_as_clips_of_the_checkpoints_length(folder):
    """A 4-frame checkpoint fed 8 frames runs two clips of 4 (positions 0-3 each), as LanguageBind's code does: the
    second clip's output equals the first's when it holds the same frames, and no frame of one clip sees the other."""
    torch.manual_seed(0)
    enc = LanguageBindVideoEncoder(cfg(folder, frames=8)).eval()
    assert enc.temporal_positions == 8 and enc.clip_frames == 4
    clip = torch.randn(1, 4, 3, 28, 28)
    other = torch.randn(1, 4, 3, 28, 28)
    with torch.no_grad():
        twice = enc(torch.cat([clip, clip], 1))
        mixed = enc(torch.cat([clip, other], 1))
        alone = LanguageBindVideoEncoder(cfg(folder, frames=4)).eval()(clip)
    assert twice.shape == (1, 8, 4, 32)
    assert torch.allclose(twice[:, :4], twice[:, 4:], atol=1e-6) and torch.allclose(twice[:, :4], alone, atol=1e-6)
    assert torch.allclose(mixed[:, :4], alone, atol=1e-6), "the first clip does not see the second"


def test_frame_count_must_be_a_multiple_of_the_clip(folder):
    with pytest.raises(ValueError, match="num_frames 6 is not a multiple of the 4-frame clips"):
        LanguageBindVideoEncoder(cfg(folder, frames=6))
    with pytest.raises(ValueError, match="asks for 56px but .* built for 28px"):
        LanguageBindVideoEncoder(cfg(folder, size=56))


def test_position_ids_are_accepted_and_anything_else_is_refused(folder):
    """Folders saved by transformers 4.x carry ``vision_model.embeddings.position_ids``; any other extra tensor, or a
    tensor of the wrong shape, is still refused, naming it."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    assert "vision_model.embeddings.position_ids" in state, "the stand-in is saved as the hub ships it"
    LanguageBindVideoEncoder(cfg(folder))
    save_file({**state, "vision_model.encoder.layers.0.extra": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['vision.encoder.layers.0.extra'\]"):
        LanguageBindVideoEncoder(cfg(folder))
    key = "vision_model.encoder.layers.0.temporal_embedding"
    save_file({**state, key: torch.zeros(1, 5, 32)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shapes \['temporal.0.embedding \[1, 5, 32\] \(expected \[1, 4, 32\]\)"):
        LanguageBindVideoEncoder(cfg(folder))
