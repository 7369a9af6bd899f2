"""The pipeline config: every shipped config validates and resolves every model; shard sets and selection."""

import pytest
import yaml
from snakemake.utils import validate

from merv.cli import deep_update
from merv.pipeline import model_run, selected_models, shard_set
from tests.helpers import REPO

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


def load(*names: str) -> dict:
    """config/config.yaml patched by further config files, as `snakemake --configfile` does."""
    config = {}
    for name in ("config.yaml", *names):
        config = deep_update(config, yaml.safe_load((REPO / "config" / name).read_text()))
    return config


@pytest.mark.parametrize("extra", [(), ("miniature.yaml",)], ids=["default", "miniature"])
def test_shipped_configs_validate_and_resolve_every_model(extra):
    config = load(*extra)
    validate(config, SCHEMA)
    for name in config["models"]:
        run = model_run(config, name)
        assert shard_set(config, name, run) in config["shards"]["sets"]
    grid = ["merv_tiny", "tiny_appearance", "tiny_motion", "tiny_channel_concat", "tiny_learnable_scalar",
            "tiny_sequence_concat"]  # fmt: skip
    assert selected_models(config) == (["merv_full"] if extra else grid)


def test_default_config_offers_merv_full_and_the_paper_presets():
    config = load()
    presets = {entry["preset"] for entry in config["models"].values()}
    assert {"merv-full", "merv-frozen", "languagebind-single", "dinov2-single", "vivit-single", "siglip-single",
            "merv-channel-concat", "merv-sequence-concat", "merv-learnable-scalar", "merv-tiny"} <= presets  # fmt: skip
    full = model_run(config, "merv_full")
    assert full.model.llm.weights == "weights/Llama-2-7b-hf" and full.model.llm.source == "hf:meta-llama/Llama-2-7b-hf"
    assert (
        shard_set(config, "merv_full", full) == "paper"
        and shard_set(config, "merv_tiny", model_run(config, "merv_tiny")) == "small"
    )


def test_miniature_keeps_the_papers_dag_shape_at_toy_size():
    config = load("miniature.yaml")
    mini, paper = model_run(config, "merv_full"), model_run(load(), "merv_full")
    assert [e.kind for e in mini.model.encoders] == [e.kind for e in paper.model.encoders]
    assert [e.arch for e in mini.model.encoders] == [e.arch for e in paper.model.encoders]
    assert {e.id: e.num_frames for e in mini.model.encoders} == {
        "languagebind": 4,
        "dinov2": 4,
        "vivit": 8,
        "siglip": 4,
    }
    assert [s.name for s in mini.train.stages] == ["align", "finetune"]
    assert mini.model.fusion.kind == paper.model.fusion.kind == "cross_attention"
    assert config["models"]["merv_full"]["weights"] == "standin"
    assert all(e.weights.startswith("data/weights/merv_full/built/") for e in mini.model.encoders)


def test_shard_set_is_the_smallest_that_fits_or_a_clear_error():
    config = load()
    config["shards"]["sets"]["mid"] = {"size": 112, "frames": [4, 8, 16]}
    assert shard_set(config, "merv_tiny", model_run(config, "merv_tiny")) == "small"
    # the per-frame ViT may take any frame count; the pretrained ViViT's count is part of its weights
    config["models"]["merv_tiny"]["overrides"] = {"model": {"encoders": {"vit": {"num_frames": 16}}}}
    assert shard_set(config, "merv_tiny", model_run(config, "merv_tiny")) == "mid"
    config["models"]["merv_tiny"]["overrides"] = {"model": {"encoders": {"vit": {"num_frames": 12}}}}
    with pytest.raises(ValueError, match=r"model 'merv_tiny' needs frames \[8, 12\] at 64px, which no shard set"):
        shard_set(config, "merv_tiny", model_run(config, "merv_tiny"))
    config["models"]["merv_tiny"]["overrides"] = {"model": {"encoders": {"vivit": {"num_frames": 16}}}}
    with pytest.raises(ValueError, match=r"pretrained_encoders.vivit: .*\(num_frames: trained 8, model 16\)"):
        model_run(config, "merv_tiny")


def test_selecting_an_unknown_model_is_an_error():
    config = load()
    config["pipeline"]["models"] = ["merv_tiny", "merv_huge"]
    with pytest.raises(ValueError, match=r"pipeline.models names \['merv_huge'\]"):
        selected_models(config)
