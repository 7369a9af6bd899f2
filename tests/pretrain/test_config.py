"""Pointing a model's encoders at pretrained weights: paths, and clear errors for mismatches."""

import pytest

from merv.config import resolve_run_config
from merv.pretrain.config import PretrainConfig, pretrain_config_from_dict, with_pretrained_encoders

SPECS = {
    "appearance": PretrainConfig(preset="merv-tiny", encoder="vit", task="appearance"),
    "motion": PretrainConfig(preset="merv-tiny", encoder="vivit", task="motion"),
}


def test_encoders_read_the_pretrained_weights():
    run = with_pretrained_encoders(resolve_run_config("merv-tiny"), {"vit": "appearance", "vivit": "motion"}, SPECS)
    weights = {e.id: e.weights for e in run.model.encoders}
    assert weights == {
        "vit": "data/weights/pretrained/appearance/model.safetensors",
        "vivit": "data/weights/pretrained/motion",
    }
    single = with_pretrained_encoders(resolve_run_config("merv-tiny-motion"), {"vivit": "motion"}, SPECS)
    assert [e.weights for e in single.model.encoders] == ["data/weights/pretrained/motion"]
    assert run.model.llm == resolve_run_config("merv-tiny").model.llm


def test_mismatches_are_named():
    run = resolve_run_config("merv-tiny", {"model": {"encoders": {"vivit": {"num_frames": 16}}}})
    with pytest.raises(
        ValueError, match=r"pretrained_encoders.vivit: encoder differs .*num_frames: trained 8, model 16"
    ):
        with_pretrained_encoders(run, {"vivit": "motion"}, SPECS)
    with pytest.raises(ValueError, match=r"no pretrain entry 'colour'"):
        with_pretrained_encoders(run, {"vit": "colour"}, SPECS)
    with pytest.raises(ValueError, match=r"the model has no encoder 'clip'"):
        with_pretrained_encoders(run, {"clip": "appearance"}, SPECS)


def test_pretrain_config_checks():
    with pytest.raises(ValueError, match=r"task 'motion' trains a hf_video encoder, but merv-tiny:vit is 'timm_image'"):
        PretrainConfig(preset="merv-tiny", encoder="vit", task="motion").encoder_config()
    with pytest.raises(ValueError, match=r"pretrain.x.task: 'depth' is not one of"):
        pretrain_config_from_dict({"preset": "merv-tiny", "encoder": "vit", "task": "depth"}, "pretrain.x")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['step'\]"):
        pretrain_config_from_dict({"preset": "merv-tiny", "encoder": "vit", "task": "motion", "step": 3})
