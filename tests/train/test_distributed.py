"""Collectives on the right device: the process group merv makes on GPU nodes serves every tensor it is given."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merv.config import resolve_run_config
from merv.train.distributed import backend_for
from tests.conftest import tiny_overrides

HERE = Path(__file__).resolve().parent


def test_a_gpu_process_group_has_a_backend_for_host_tensors():
    assert backend_for("cuda:3") == "cpu:gloo,cuda:nccl" and backend_for("cpu") == "gloo"


@pytest.mark.slow
def test_a_stage_trains_on_two_ranks_in_the_group_of_a_gpu_node(tiny_run, shards, tmp_path):
    """Two ranks train, stop on one rank's request (saving a DCP state), resume from it (DCP load) and finish, in
    the group merv's ``init_distributed`` makes on a GPU node, with NCCL replaced by a stand-in that serves CUDA
    tensors only, as NCCL does (``tests/train/gpu_group.py``). The steps run on the CPU: every collective on a host
    tensor needs the group's CPU backend."""
    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    overrides["train"] = {"stages": {"finetune": {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 2,
                                                   "num_workers": 0, "checkpoint_every": 0}}}  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(json.dumps(resolve_run_config("merv-tiny", overrides).to_dict()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(HERE / "gpu_group.py"),
           str(config), str(shards["finetune"]), str(tmp_path / "out")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "rank 0: process group serves ['cpu', 'cuda']" in res.stdout
    assert "resuming from" in res.stderr and "(step 1 of 3)" in res.stderr, res.stderr[-3000:]
    assert '"step": 3, "processes": 2, "samples_seen": 12' in res.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["processes"] == 2 and meta["step"] == 3
