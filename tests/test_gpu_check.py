"""``benchmarks/gpu_check.py --dry-run``: the script a lent GPU machine runs, on the CPU at toy size, so that it
cannot rot between GPU sessions (its GPU-only differences: NCCL for gloo, the 1.1B model for toy stand-ins)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_its_code_on_the_cpu(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(tmp_path / "r.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["collectives"]["dcp"] == "ok" and "cpu" in result["collectives"]["group serves"]
    steps = result["train_step"]
    assert steps["scale"] == "toy" and steps["cached"]["step_s"] > 0 and steps["on_the_fly"]["step_s"] > 0
    features = result["features"]
    assert features["tiny_stage1"]["cached_speedup"] > 0 and features["stage2_step"]["cached_speedup"] > 0
    for row in ("process group (one process)", "FSDP2 bf16 policy, encoders on the fly", "4 encoders / 1"):
        assert row in res.stdout, res.stdout
