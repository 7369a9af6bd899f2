import dataclasses

import pytest

from merv.config import (
    ProjectorConfig,
    available_presets,
    deep_merge,
    fingerprint,
    preset_dict,
    resolve_run_config,
    run_config_from_dict,
)


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_resolves(name):
    run = resolve_run_config(name)
    assert run.model.encoders and run.train.stages
    # a round trip through dict gives the same typed config
    assert run_config_from_dict(run.to_dict()) == run


def test_tiny_preset_shape():
    run = resolve_run_config("merv-tiny")
    kinds = {e.kind for e in run.model.encoders}
    assert kinds == {"timm_image", "hf_video"}, "merv-tiny needs an image and a video encoder"
    assert len({e.num_frames for e in run.model.encoders}) == 2, "encoders must differ in frame count"
    assert [s.name for s in run.train.stages] == ["align", "finetune"]


def test_overrides_patch_one_encoder_by_id():
    run = resolve_run_config("merv-tiny", {"model": {"encoders": {"vivit": {"num_frames": 16}}}})
    frames = {e.id: e.num_frames for e in run.model.encoders}
    assert frames == {"vit": 4, "vivit": 16}


def test_override_of_unknown_encoder_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"no item with that id; known: \['vit', 'vivit'\]"):
        resolve_run_config("merv-tiny", {"model": {"encoders": {"siglip": {"num_frames": 8}}}})


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="available: .*merv-tiny"):
        resolve_run_config("merv-huge")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model": {"projector": {"tokens_per_frame": 5}}}, "perfect square"),
        (
            {"model": {"fusion": {"kind": "magic"}}},
            r"model.fusion.kind: 'magic' is not one of \['cross_attention', 'learnable_scalar'",
        ),
        ({"model": {"llm": {"prompt_fmt": "x"}}}, r"unknown key\(s\) \['prompt_fmt'\]"),
        ({"model": {"encoders": {"vit": {"num_frames": 0}}}}, "num_frames must be >= 1"),
        ({"train": {"stages": {"align": {"micro_batch_size": 5}}}}, "not a multiple of micro_batch_size"),
        ({"train": {"stages": {"align": {"trainable": ["projectors", "vision"]}}}}, "'vision' is not one of"),
        ({"train": {"stages": {"align": {"lr": "fast"}}}}, "expected float"),
        ({"model": {"dtype": "float16"}}, r"model.dtype: 'float16' is not one of \['fp32', 'bf16', 'fp16'\]"),
        ({"train": {"checkpoint_dtype": "fp8"}}, r"train.checkpoint_dtype: 'fp8' is not one of"),
        (
            {"model": {"dtype": "fp16"}, "train": {"stages": {"align": {"mixed_precision": "bf16"}}}},
            r"model.dtype 'fp16' with mixed_precision 'bf16' in stage\(s\) \['align'\]",
        ),
    ],
)
def test_bad_config_names_the_key(patch, message):
    with pytest.raises(ValueError, match=message):
        resolve_run_config("merv-tiny", patch)


def test_missing_required_key():
    data = preset_dict("merv-tiny")
    del data["model"]["llm"]
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['llm'\]"):
        run_config_from_dict(data)


def test_deep_merge_does_not_mutate_and_replaces_plain_lists():
    base = {"a": {"b": 1, "c": [1, 2]}}
    out = deep_merge(base, {"a": {"c": [3]}})
    assert out == {"a": {"b": 1, "c": [3]}} and base == {"a": {"b": 1, "c": [1, 2]}}


def test_fingerprint_is_stable_and_sensitive():
    run = resolve_run_config("merv-tiny")
    assert run.fingerprint() == resolve_run_config("merv-tiny").fingerprint()
    other = resolve_run_config("merv-tiny", {"train": {"seed": 8}})
    assert other.fingerprint() != run.fingerprint()
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_projector_config_is_frozen():
    cfg = ProjectorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tokens_per_frame = 4
    assert cfg.visual_tokens == 16 * 64


def test_visual_tokens_must_leave_room_for_text():
    """Four encoders' full grids concatenated are 4096 visual tokens: in a 2048 context every sample's text would be
    cut away (the loss is NaN), so the config is refused before anything runs."""
    with pytest.raises(ValueError, match=r"4096 visual tokens leave -2048 of llm.max_length 2048 for text"):
        resolve_run_config("merv-frozen", {"model": {"fusion": {"kind": "sequence_concat", "attn_dim": None}}})
    with pytest.raises(ValueError, match=r"keep at least 64"):
        resolve_run_config("merv-tiny", {"model": {"projector": {"temporal_tokens": 13}}})  # 208 of 256
    assert resolve_run_config("merv-tiny", {"model": {"projector": {"temporal_tokens": 12}}}).model.visual_tokens == 192
