"""Exact resume: a training run killed with SIGKILL and started again ends bitwise where an uninterrupted run ends."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merv.config import resolve_run_config, with_loader_workers
from merv.settings import ComputeSection
from merv.train.state import latest_state, work_dir
from tests.conftest import tiny_overrides
from tests.helpers import descendants


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (found through /proc), as a lost node would end them."""
    for victim in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


LOADER_WORKERS = ComputeSection.loader_workers


def train_cmd(config: str, data, out):
    cmd = [sys.executable, "-m", "merv.cli", "train", "--config", config, "--stage", "finetune", "--data", str(data)]
    return cmd + ["--out", str(out), "--no-progress"]


@pytest.mark.slow  # trains twice and kills a run: ~40 s
def test_sigkill_then_resume_equals_uninterrupted(tiny_run, shards, tmp_path):

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
        # the config as trained: `merv train` fills the stages' unset loader workers (config compute.loader_workers)
        and state_meta["config"] == json.loads(json.dumps(with_loader_workers(run, LOADER_WORKERS).to_dict()))
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
    from tests.train.test_state import small_state

    small_state(work_dir(tmp_path / "x"), 4, "other")
    assert latest_state(work_dir(tmp_path / "x"), "mine") is None
    assert latest_state(work_dir(tmp_path / "x"), "other").name == "step-00000004"


@pytest.mark.slow
def test_two_ranks_on_unequal_shards_killed_and_resumed_equal_uninterrupted(tiny_run, unequal_shards, tmp_path):
    """2 gloo ranks with a DataLoader worker each, on shards of unequal sizes: SIGKILL every process mid-epoch, start
    again, and the weights end bitwise equal to an uninterrupted 2-rank run (each rank restores its own data
    position and RNG states)."""

    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    stage = {"epochs": 6, "global_batch_size": 4, "micro_batch_size": 2, "checkpoint_every": 3, "num_workers": 1}
    overrides["train"] = {"stages": {"finetune": {**stage, "shuffle_buffer": 4}}}
    config = json.dumps(resolve_run_config("merv-tiny", overrides).to_dict())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cmd(out):
        return torchrun + train_cmd(config, unequal_shards, out)[2:]

    full = subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, env=env, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while not (work_dir(cut) / "step-00000006").exists() and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(proc.pid)  # torchrun, both ranks (each in a session of its own) and their DataLoader workers
    proc.wait()
    assert not cut.exists(), "killed before the end"
    ranks = sorted(p.name for p in (work_dir(cut) / "step-00000006").glob("rank-*.json"))
    assert ranks == ["rank-0.json", "rank-1.json"]
    again = subprocess.run(cmd(cut), capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bitwise equal weights"
    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (tmp_path / "full", cut))
    assert meta_a["processes"] == 2 and meta_a["workers"] == 1
    assert meta_a["data_position"] == meta_b["data_position"] and meta_a["samples_seen"] == meta_b["samples_seen"]
