"""submitit launch: N local processes, and a real Slurm cluster (2 tasks; preemption -> requeue -> resume)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merv.config import resolve_run_config
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def config(tiny_run, **stage) -> str:
    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    stage = {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 2, **stage}
    overrides["train"] = {"stages": {"finetune": stage}}
    return json.dumps(resolve_run_config("merv-tiny", overrides).to_dict())


def merv_train(cfg, data, out, *launch, env=None, timeout=600):
    cmd = [sys.executable, "-m", "merv.cli", "train", "--config", cfg, "--stage", "finetune", "--data", str(data)]
    return subprocess.run([*cmd, "--out", str(out), *map(str, launch)], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


def test_local_launcher_runs_two_processes(tiny_run, shards, tmp_path):
    res = merv_train(config(tiny_run), shards["finetune"], tmp_path / "out", "--launcher", "local",
                     "--tasks-per-node", 2, "--submitit-dir", tmp_path / "submitit")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["processes"] == 2 and meta["samples_seen"] == 12


def test_two_task_job_on_slurm(slurm, tiny_run, shards, tmp_path):
    res = merv_train(config(tiny_run), shards["finetune"], tmp_path / "out", "--launcher", "slurm",
                     "--tasks-per-node", 2, "--partition", "debug", "--time", 10,
                     "--submitit-dir", tmp_path / "submitit", env=slurm)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["processes"] == 2
    job_id = next(p.name for p in (tmp_path / "submitit").iterdir() if p.name.isdigit())
    deadline = time.time() + 60  # accounting trails the job's end by a few seconds
    while True:
        sacct = ["sacct", "-j", job_id, "-n", "-X", "-o", "State"]
        state = subprocess.run(sacct, capture_output=True, text=True, env=slurm).stdout.strip()
        if state == "COMPLETED" or time.time() > deadline:
            break
        time.sleep(1)
    assert state == "COMPLETED"


def test_preempted_job_is_requeued_and_resumes(slurm, tiny_run, shards, tmp_path):
    cfg = config(tiny_run, epochs=40)  # 120 steps and no periodic states: the only state is the one saved on signal
    submit = [sys.executable, "-m", "merv.cli", "train", "--config", cfg, "--stage", "finetune", "--data",
              str(shards["finetune"]), "--out", str(tmp_path / "out"), "--launcher", "slurm", "--tasks-per-node", 1,
              "--partition", "debug", "--time", 10, "--submitit-dir", str(tmp_path / "submitit")]  # fmt: skip
    proc = subprocess.Popen([*map(str, submit)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm)
    deadline = time.time() + 300
    while "finetune step 24/120" not in "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_log.err")):
        assert time.time() < deadline and proc.poll() is None, "training did not get going"
        time.sleep(0.2)
    job_id = next(p.name for p in (tmp_path / "submitit").iterdir() if p.name.isdigit())
    # what Slurm does before preempting a job submitted by submitit (--signal=USR2@delay): USR2 to its processes
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, env=slurm)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_log.err"))
    assert "state saved at step" in logs and "resuming from" in logs, logs[-3000:]
    saved = int(logs.split("state saved at step ")[1].split(",")[0])
    assert 24 <= saved < 120 and f"(step {saved} of 120)" in logs, "resumed exactly where it stopped"
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["step"] == 120 and meta["samples_seen"] == 480
