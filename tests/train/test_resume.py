"""Exact resume: a training run killed with SIGKILL and started again ends bitwise where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from merv.config import resolve_run_config
from merv.train.state import latest_state, work_dir
from tests.conftest import tiny_overrides


def train_cmd(config: str, data, out):
    cmd = [sys.executable, "-m", "merv.cli", "train", "--config", config, "--stage", "finetune", "--data", str(data)]
    return cmd + ["--out", str(out), "--no-progress"]


def test_sigkill_then_resume_equals_uninterrupted(tiny_run, shards, tmp_path):
    from pathlib import Path

    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    overrides["train"] = {
        "stages": {"finetune": {"epochs": 20, "global_batch_size": 4, "micro_batch_size": 2, "checkpoint_every": 5}}
    }
    run = resolve_run_config("merv-tiny", overrides)
    config = json.dumps(run.to_dict())
    total = 12 * 20 // 4  # 60 steps

    full = subprocess.run(train_cmd(config, shards["finetune"], tmp_path / "full"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    assert not work_dir(tmp_path / "full").exists(), "a finished stage removes its resumable states"

    cut = tmp_path / "cut"
    proc = subprocess.Popen(train_cmd(config, shards["finetune"], cut), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (work_dir(cut) / "step-00000010").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not cut.exists(), "killed before the end"
    states = sorted(p.name for p in work_dir(cut).iterdir())
    state_meta = json.loads((work_dir(cut) / "step-00000010" / "meta.json").read_text())
    assert (
        state_meta["step"] == 10
        and state_meta["config"] == json.loads(json.dumps(run.to_dict()))
        and state_meta["stage"] == "finetune"
    )
    assert "step-00000010" in states and len([s for s in states if not s.endswith(".tmp")]) <= 2  # keep_last

    again = subprocess.run(train_cmd(config, shards["finetune"], cut), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    resumed_at = int(again.stderr.split("(step ")[1].split(" ")[0])
    assert 10 <= resumed_at < total

    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bitwise equal weights"
    meta_a = json.loads((tmp_path / "full" / "meta.json").read_text())
    meta_b = json.loads((cut / "meta.json").read_text())
    assert meta_a["data_position"] == meta_b["data_position"] and meta_a["samples_seen"] == meta_b["samples_seen"]
    losses = [json.loads(x)["loss"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == total, "metrics of the killed run are kept"


def test_a_state_of_other_settings_is_not_resumed(tmp_path):
    (tmp_path / "x.work" / "step-00000004").mkdir(parents=True)
    (tmp_path / "x.work" / "step-00000004" / "meta.json").write_text(json.dumps({"fingerprint": "other"}))
    assert latest_state(work_dir(tmp_path / "x"), "mine") is None
    assert latest_state(work_dir(tmp_path / "x"), "other").name == "step-00000004"
