"""Frozen weights are found from any working directory, after the results folder moves, and on another machine."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merv.checkpoint import load_checkpoint, save_checkpoint
from merv.config import resolve_run_config
from merv.models.merv import MERV
from merv.weights import ENV, WeightsNotFound, resolve, resolve_model
from merv.weights import project_record as record


@pytest.fixture
def project(tiny_run, tmp_path, monkeypatch):
    """A project folder with merv-tiny's weights at the preset's relative paths and a checkpoint trained in it."""
    root = tmp_path / "project"
    weights = Path(tiny_run.model.llm.weights).parent
    shutil.copytree(weights, root / "data" / "weights" / "merv-tiny")
    monkeypatch.chdir(root)
    monkeypatch.delenv(ENV, raising=False)
    run = resolve_run_config("merv-tiny")  # relative paths: data/weights/merv-tiny/...
    assert not Path(run.model.llm.weights).is_absolute()
    torch.manual_seed(0)
    model = MERV.from_config(run.model)
    ckpt = root / "results" / "merv_tiny" / "finetune"
    save_checkpoint(model, run, ckpt, {"trained_groups": ["projectors", "fusion"], "project": record(ckpt)})
    monkeypatch.chdir(tmp_path)
    return root, ckpt


def test_resolution_order_and_the_error(tmp_path, monkeypatch):
    (tmp_path / "a" / "w").mkdir(parents=True)
    (tmp_path / "b" / "w").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV, f"{tmp_path / 'nowhere'}{os.pathsep}{tmp_path / 'b'}")
    assert resolve("w", "x", [tmp_path / "a"]) == tmp_path / "b" / "w", "MERV_WEIGHTS roots come first"
    monkeypatch.delenv(ENV)
    assert resolve("w", "x", [tmp_path / "a"]) == tmp_path / "a" / "w"
    assert resolve(str(tmp_path / "b" / "w"), "x") == tmp_path / "b" / "w"
    with pytest.raises(WeightsNotFound) as err:
        resolve("missing/llm", "LLM weights", [tmp_path / "a"])
    text = str(err.value)
    assert text.startswith("LLM weights: 'missing/llm' not found; looked in:")
    assert str(tmp_path / "a" / "missing" / "llm") in text and str(tmp_path / "missing" / "llm") in text
    assert ENV in text


def test_checkpoint_loads_from_another_working_directory(project, tmp_path, synth_dir):
    root, ckpt = project
    assert Path.cwd() == tmp_path and not (tmp_path / "data").exists()
    model, _, _ = load_checkpoint(ckpt)
    assert Path(model.cfg.llm.weights) == root / "data" / "weights" / "merv-tiny" / "llm"
    # the example, through the command line, from a folder that is not the project
    video = synth_dir / "eval_data" / "synth_open" / "videos" / "eval_00000.mp4"
    res = subprocess.run(
        [sys.executable, "-m", "merv.cli", "generate", "--model", str(ckpt), "--video", str(video),
         "--prompt", "Hi", "--max-new-tokens", "2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_moved_results_folder_and_another_machine(project, tmp_path, monkeypatch):
    root, ckpt = project
    moved = tmp_path / "elsewhere" / "results"
    shutil.copytree(root / "results", moved)
    load_checkpoint(moved / "merv_tiny" / "finetune")  # found at the project's recorded absolute path
    # the whole project copied to another machine (the original path gone): found relative to the checkpoint
    shutil.move(root, tmp_path / "machine2")
    model, _, _ = load_checkpoint(tmp_path / "machine2" / "results" / "merv_tiny" / "finetune")
    assert Path(model.cfg.llm.weights).is_relative_to(tmp_path / "machine2")
    # only the results folder, without the project: a clear error, then MERV_WEIGHTS points at the weights
    with pytest.raises(WeightsNotFound, match=r"encoder 'vit' weights: 'data/weights/merv-tiny/vit/model.safetensors'"):
        load_checkpoint(moved / "merv_tiny" / "finetune")
    monkeypatch.setenv(ENV, str(tmp_path / "machine2"))
    load_checkpoint(moved / "merv_tiny" / "finetune")


def test_resolved_configs_make_preprocessing_explicit(tiny_run):
    cfg = resolve_model(tiny_run.model)
    for enc in cfg.encoders:
        assert enc.resize in ("squash", "crop") and len(enc.mean) == len(enc.std) == 3 and enc.crop_pct
