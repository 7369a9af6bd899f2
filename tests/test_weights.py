"""Weights: looked up under $MERV_WEIGHTS then the working directory, fetched when missing (never offline), built
locally as stand-ins in the configured shape."""

import json
from pathlib import Path

import pytest

from merv.config import resolve_run_config
from merv.weights import (
    MissingWeightsError,
    build_local_weights,
    fetch_weights,
    weight_parts,
    with_local_weights,
)


def place(root: Path, run) -> None:
    """Put something that passes for each weight of ``run`` under ``root`` (a file, or a folder with config.json)."""
    for part in weight_parts(run):
        path = root / part.path
        if part.is_file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"weights")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")


def test_offline_fetch_lists_every_missing_weight_with_where_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MERV_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    run = resolve_run_config("merv-full")
    with pytest.raises(MissingWeightsError) as err:
        fetch_weights(run)
    message = str(err.value)
    assert message.startswith("5 of 5 weights of merv-full are missing")
    for part, source in [
        ("encoder languagebind: weights/LanguageBind_Video_merge", "hf:LanguageBind/LanguageBind_Video_merge"),
        ("encoder dinov2: weights/dinov2-vitl14-reg4/model.safetensors", "timm:vit_large_patch14_reg4_dinov2.lvd142m"),
        ("encoder vivit: weights/vivit-b-16x2-kinetics400", "hf:google/vivit-b-16x2-kinetics400"),
        ("encoder siglip: weights/siglip-vitb16-224/model.safetensors", "timm:vit_base_patch16_siglip_224.webli"),
        ("llm: weights/Llama-2-7b-hf", "hf:meta-llama/Llama-2-7b-hf"),
    ]:
        line = next(line for line in message.splitlines() if part in line)
        assert f"source {source}" in line and f"looked in {tmp_path}/" in line and "offline" in line


def test_weights_are_found_under_merv_weights_first_then_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = resolve_run_config("merv-full")
    shared, project = tmp_path / "shared", tmp_path / "project"
    place(project, run)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MERV_WEIGHTS", str(shared))
    records = fetch_weights(run)
    assert all(r["path"].startswith(str(project)) and not r["downloaded"] for r in records)
    place(shared, run)
    assert all(r["path"].startswith(str(shared)) for r in fetch_weights(run))


def test_only_the_missing_weights_are_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = resolve_run_config("merv-full")
    place(tmp_path, run)
    (tmp_path / "weights" / "vivit-b-16x2-kinetics400" / "config.json").unlink()  # an incomplete folder
    with pytest.raises(MissingWeightsError, match=r"^1 of 5 weights of merv-full are missing:\n  encoder vivit: "):
        fetch_weights(run, root=tmp_path)


def test_a_weight_without_a_source_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run = resolve_run_config("merv-tiny")
    with pytest.raises(MissingWeightsError, match="encoder vit: .* no source is configured"):
        fetch_weights(run, root=tmp_path)


def test_a_malformed_source_is_a_config_error():
    with pytest.raises(ValueError, match="encoder 'dinov2': source must look like hf:<name> or timm:<name>"):
        resolve_run_config("dinov2-single", {"model": {"encoders": {"dinov2": {"source": "s3://bucket/dino"}}}})
    with pytest.raises(ValueError, match="llm: source must look like hf:<name>, got 'timm:x'"):
        resolve_run_config("merv-tiny", {"model": {"llm": {"source": "timm:x"}}})


def test_standins_are_built_in_the_configured_shape(tmp_path):
    toy = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    run = resolve_run_config(
        "merv-full",
        {"model": {"encoders": {"dinov2": {"image_size": 56, "num_frames": 4, "model_kwargs": {"img_size": 56, **toy}},
                                "siglip": {"image_size": 64, "num_frames": 4, "model_kwargs": {"img_size": 64, **toy}},
                                "languagebind": {"image_size": 56, "num_frames": 4},
                                "vivit": {"image_size": 64, "num_frames": 8}}}},
    )  # fmt: skip
    run = with_local_weights(run, tmp_path / "built")
    written = build_local_weights(run, "standin")
    assert written[1] == tmp_path / "built" / "dinov2" / "model.safetensors" and written[1].is_file()
    assert json.loads((tmp_path / "built" / "llm" / "config.json").read_text())["model_type"] == "llama"
    # a timm encoder whose config does not carry the stand-in's dimensions would not load them: refused
    wrong = with_local_weights(resolve_run_config("siglip-single"), tmp_path / "wrong")
    with pytest.raises(ValueError, match="encoder 'siglip': its stand-in is built with model_kwargs"):
        build_local_weights(wrong, "standin")
