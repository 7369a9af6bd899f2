"""Encoder features are taken where the original MERV takes them (its backbones, read in its public code):

- LanguageBind-Video: ``featurizer(video, output_hidden_states=True).hidden_states[-2]``, CLS dropped;
- DINOv2 (timm, reg4) and SigLIP (timm): ``featurizer.get_intermediate_layers(n={len(blocks) - 2})`` (the
  penultimate block, no final norm, prefix tokens dropped);
- ViViT (transformers): ``last_hidden_state[:, 1:]`` (the final output after the last layer norm, CLS dropped).
"""

import pytest
import torch

from merv.config import resolve_run_config
from merv.models.backbone import layer_index
from merv.models.encoders import build_encoder
from merv.models.standins import build_standin_weights

ORIGINAL_CHOICE = {"languagebind": -2, "dinov2": -2, "siglip": -2, "vivit": None}


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """merv-frozen with toy stand-ins of its four encoder families (2 blocks each)."""
    return build_standin_weights(resolve_run_config("merv-frozen"), tmp_path_factory.mktemp("frozen"))


@pytest.mark.parametrize("preset", ["merv-frozen", "merv-full", "merv-channel-concat", "dinov2-single"])
def test_presets_take_the_originals_layers(preset):
    for enc in resolve_run_config(preset).model.encoders:
        assert enc.feature_layer == ORIGINAL_CHOICE[enc.id], enc.id


@pytest.mark.parametrize("encoder", ["dinov2", "siglip"])
def test_timm_penultimate_block_equals_get_intermediate_layers(frozen, encoder):
    import timm

    cfg = next(e for e in frozen.model.encoders if e.id == encoder)
    ours = build_encoder(cfg).eval()
    reference = timm.create_model(
        cfg.arch, pretrained=True, pretrained_cfg_overlay={"file": cfg.weights}, num_classes=0, **cfg.model_kwargs
    ).eval()
    frames = torch.randn(1, 3, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        (expected,) = reference.get_intermediate_layers(frames.flatten(0, 1), n={len(reference.blocks) - 2})
        got = ours(frames)
    assert len(ours.model.blocks) == len(reference.blocks) - 1, "the unused last block is removed"
    assert got.shape == (1, 3, ours.tokens_per_frame, ours.embed_dim)
    assert torch.allclose(got.flatten(0, 1), expected, atol=1e-6)


def test_languagebind_hidden_states_minus_two(frozen):
    import dataclasses

    cfg = next(e for e in frozen.model.encoders if e.id == "languagebind")
    ours = build_encoder(cfg).eval()
    full = build_encoder(dataclasses.replace(cfg, feature_layer=None)).eval()
    video = torch.randn(2, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    hidden = []  # hidden_states as transformers' CLIP numbers them: 0 after pre_layrnorm, i after layer i
    with torch.no_grad():
        x = full.vision.pre_layrnorm(full.vision.embeddings(video.flatten(0, 1)))
        hidden.append(x)
        for layer, temporal in zip(full.vision.encoder.layers, full.temporal, strict=True):
            x = temporal(x, full.clip_frames)  # 16 frames: two clips of the stand-in's 8
            x = x + layer.self_attn(hidden_states=layer.layer_norm1(x))[0]
            x = x + layer.mlp(layer.layer_norm2(x))
            hidden.append(x)
        expected = hidden[-2][:, 1:].unflatten(0, (2, cfg.num_frames))
        assert torch.allclose(ours(video), expected, atol=1e-6)
        assert torch.allclose(full(video), hidden[-1][:, 1:].unflatten(0, (2, cfg.num_frames)), atol=1e-6)


def test_vivit_final_output_and_other_layers(frozen):
    import dataclasses

    cfg = next(e for e in frozen.model.encoders if e.id == "vivit")
    final = build_encoder(cfg).eval()
    video = torch.randn(1, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = final.model(pixel_values=video, output_hidden_states=True)
        assert torch.allclose(final(video).flatten(1, 2), out.last_hidden_state[:, 1:], atol=1e-6)
        minus_two = build_encoder(dataclasses.replace(cfg, feature_layer=-2)).eval()
        assert torch.allclose(minus_two(video).flatten(1, 2), out.hidden_states[-2][:, 1:], atol=1e-6)


def test_feature_layer_out_of_range_is_a_clear_error(frozen):
    import dataclasses

    cfg = next(e for e in frozen.model.encoders if e.id == "dinov2")
    with pytest.raises(ValueError, match=r"encoder 'dinov2': feature_layer 5 is outside this 2-block model"):
        build_encoder(dataclasses.replace(cfg, feature_layer=5))
    assert [layer_index(k, 24, "x") for k in (-1, -2, 0, 24)] == [24, 23, 0, 24]


def test_conv_stem_vit_saves_and_loads_through_timm(tmp_path):
    """embed_layer: conv_stem builds timm's ViT with a convolutional stem: the same token grid as the strided patch
    projection, saved as a timm state dict and loaded back by timm's pretrained loader (merv's path) unchanged."""
    import dataclasses

    from merv.models.tiny import init_encoder, save_encoder

    vit = next(e for e in resolve_run_config("merv-tiny").model.encoders if e.id == "vit")
    plain = dataclasses.replace(vit, weights=str(tmp_path / "plain.safetensors"))
    stem = dataclasses.replace(plain, weights=str(tmp_path / "stem.safetensors"),
                               model_kwargs={**vit.model_kwargs, "embed_layer": "conv_stem"})  # fmt: skip
    torch.manual_seed(0)
    module = init_encoder(stem)
    assert [type(m).__name__ for m in module.patch_embed.proj][:3] == ["Conv2d", "StemBatchNorm", "ReLU"]
    save_encoder(stem, module)
    save_encoder(plain, init_encoder(plain))
    loaded, reference = build_encoder(stem).eval(), build_encoder(plain)
    assert (loaded.tokens_per_frame, loaded.embed_dim) == (reference.tokens_per_frame, reference.embed_dim)
    x = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        expected = module.eval().forward_features(x.flatten(0, 1))[:, 1:].unflatten(0, (2, 4))
        assert torch.equal(loaded(x), expected)
    with pytest.raises(ValueError, match=r"encoder 'vit': unknown embed_layer 'convstem'; known: \['conv_stem'\]"):
        build_encoder(dataclasses.replace(stem, model_kwargs={**vit.model_kwargs, "embed_layer": "convstem"}))


def test_the_stems_batch_norm_is_torchs_in_fp32_and_takes_bf16_when_frozen():
    """(A frozen conv-stem encoder under FSDP2's bf16 policy holds bf16 weights beside fp32 running statistics.)"""
    from merv.models.encoders import StemBatchNorm

    torch.manual_seed(0)
    ours, torchs = StemBatchNorm(8), torch.nn.BatchNorm2d(8)
    for bn in (ours, torchs):  # the same non-trivial statistics and affine parameters
        bn.train()
        bn(torch.randn(4, 8, 5, 5) * 3 + 1)
    torchs.load_state_dict(ours.state_dict())
    ours.eval(), torchs.eval()
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(ours(x), torchs(x))
    ours.weight.data = ours.weight.data.bfloat16()
    ours.bias.data = ours.bias.data.bfloat16()
    with pytest.raises(RuntimeError):
        torch.nn.functional.batch_norm(x.bfloat16(), ours.running_mean, ours.running_var, ours.weight, ours.bias)
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), torchs(x), atol=0.05)
