"""Linear probes of the pretrained encoders: the logistic regression against its optimality condition, the probe
against labels it must (and must not) find, the table and the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from merv.pretrain.config import PretrainConfig, ProbeSettings
from merv.pretrain.probe import (
    LABELS,
    fit_logistic,
    pretext_clips,
    probe_accuracy,
    probe_clips,
    probe_encoders,
    write_probe,
)
from merv.pretrain.train import train_encoder


def test_logistic_regression_meets_its_optimality_condition():
    """At the minimum of mean cross-entropy + l2 * |W|^2 (bias unpenalised) the gradient vanishes:
    X1^T (softmax(X1 W) - Y) / n + 2 l2 [W; 0] = 0."""
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(120, 6)))
    y = torch.as_tensor(rng.integers(0, 3, 120))
    l2 = 0.01
    w = fit_logistic(x, y, 3, l2)
    x1 = torch.cat([x, torch.ones(120, 1, dtype=x.dtype)], 1)
    grad = x1.T @ (torch.softmax(x1 @ w, 1) - torch.nn.functional.one_hot(y, 3).double()) / 120
    grad[:-1] += 2 * l2 * w[:-1]
    assert grad.abs().max() < 1e-6


def test_probe_finds_a_linear_label_and_not_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    signal = torch.as_tensor(np.eye(4)[labels] + rng.normal(0, 0.2, (300, 4)))
    noise = torch.as_tensor(rng.normal(size=(300, 4)))
    assert probe_accuracy(signal, labels, 4, 200, 1e-3) > 0.95
    assert probe_accuracy(noise, labels, 4, 200, 1e-3) < 0.4  # chance 0.25


def test_probe_clips_are_the_benchmarks_kind_and_not_its_clips():
    clips, frames = probe_clips(ProbeSettings(train_clips=20, test_clips=10, seed=5))
    assert frames.shape == (30, 16, 64, 64, 3) and frames.dtype == np.uint8
    assert {c.shape for c in clips} <= set(LABELS["shape"]) and {c.first for c in clips} <= set(
        LABELS["first_direction"]
    )
    assert all(c.name.startswith("probe_") for c in clips)
    again, _ = probe_clips(ProbeSettings(train_clips=20, test_clips=10, seed=5))
    assert clips == again


def test_pretext_probe_clips_have_one_label_all_along():
    sets = pretext_clips(ProbeSettings(train_clips=20, test_clips=10, seed=5))
    shapes, kinds = sets["pretext_shape"]
    assert shapes.shape == (30, 1, 64, 64, 3) and set(kinds) <= set(range(len(LABELS["pretext_shape"])))
    clips, directions = sets["pretext_direction"]
    assert clips.shape == (30, 16, 64, 64, 3) and set(directions) <= set(range(len(LABELS["pretext_direction"])))
    moved = [np.abs(c[-1].astype(int) - c[0].astype(int)).sum() > 0 for c in clips]
    assert moved == [d != 0 for d in directions], "still clips (direction 0) do not move, the others do"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Both pretext encoders, trained a few steps into data/weights/pretrained's layout."""
    root = tmp_path_factory.mktemp("pretrained")
    specs = {
        "appearance": PretrainConfig("merv-tiny", "vit", "appearance", steps=3, batch_size=4, eval_samples=4, seed=11),
        "motion": PretrainConfig("merv-tiny", "vivit", "motion", steps=3, batch_size=4, eval_samples=4, seed=12),
    }
    for name, spec in specs.items():
        train_encoder(spec, root / name)
    return root, specs


@pytest.mark.slow  # trains two encoders, then probes 240 clips
def test_probe_table_rows_and_files(pretrained, tmp_path):
    root, specs = pretrained
    settings = ProbeSettings(train_clips=160, test_clips=80)
    rows = probe_encoders(specs, root, settings, tmp_path / "scratch")
    assert [(r["encoder"], r["state"]) for r in rows] == [
        ("appearance", "pretrained"), ("appearance", "random init"), ("motion", "pretrained"), ("motion", "random init")
    ]  # fmt: skip
    for r in rows:
        assert all(0 <= r[k] <= 1 for k in LABELS)
    # colour is in the mean of any encoder's patch features, even at its random initialisation
    assert all(r["colour"] >= 0.8 for r in rows), rows
    written = write_probe(rows, settings, tmp_path / "out")
    assert [p.name for p in written] == ["probe.csv", "probe.md", "probe.json"]
    csv = (tmp_path / "out" / "probe.csv").read_text().splitlines()
    labels = "colour,shape,first_direction,last_direction,pretext_shape,pretext_direction"
    assert csv[0] == f"encoder,architecture,task,state,{labels}" and len(csv) == 5
    md = (tmp_path / "out" / "probe.md").read_text()
    assert "| chance | | | 25.0 | 33.3 | 25.0 | 25.0 | 12.5 | 11.1 |" in md
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["rows"] == rows


@pytest.mark.slow  # trains two encoders, then probes 240 clips
def test_probe_cli_names_an_unknown_encoder(pretrained, tmp_path):
    root, specs = pretrained
    section = json.dumps({"appearance": {"preset": "merv-tiny", "encoder": "vit", "task": "appearance"}})
    cmd = [
        sys.executable,
        "-m",
        "merv.cli",
        "probe",
        "--pretrain",
        section,
        "--root",
        str(root),
        "--out",
        str(tmp_path),
    ]
    res = subprocess.run([*cmd, "--encoder", "colour"], capture_output=True, text=True)
    assert (
        res.returncode == 1 and "--encoder ['colour']: not in the pretrain config (it has ['appearance'])" in res.stderr
    )
