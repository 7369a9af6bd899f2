"""submitit launch: N local processes, and a real Slurm cluster (2 tasks; a job submitted from inside a job;
preemption -> requeue -> resume)."""

import json
import re
import subprocess
import sys
import threading
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


def job_logs(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(folder.rglob("*_log.err")))


def exported(logs: str) -> list[dict]:
    """The torch variables each task of a job logged after taking its place (merv.train.launch.join_job)."""
    lines = re.findall(r"job \S+ on \S+ \(\S+\): (RANK=.*)", logs)
    return sorted((dict(kv.split("=", 1) for kv in line.split()) for line in lines), key=lambda e: e["RANK"])


def test_rendezvous_ports_of_live_jobs_never_collide(tmp_path):
    """Two live jobs of two ranks each: each rank 0 serves its store on a port the OS gave it and publishes it;
    the other rank finds it. Both stores are up at once, on different ports, and each job's ranks talk."""
    from merv.train.launch import rendezvous

    stores = {}

    def join(job, rank):
        stores[job, rank] = rendezvous(tmp_path / f"{job}.json", rank, 2, "127.0.0.1")

    threads = [threading.Thread(target=join, args=(job, rank)) for job in "ab" for rank in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(stores) == 4
    ports = {job: json.loads((tmp_path / f"{job}.json").read_text())["port"] for job in "ab"}
    assert ports["a"] != ports["b"] and ports == {job: stores[job, 1].port for job in "ab"}
    for job in "ab":
        stores[job, 1].set("from-rank-1", job)
        assert stores[job, 0].get("from-rank-1") == job.encode()


def test_local_launcher_runs_two_processes(tiny_run, shards, tmp_path):
    res = merv_train(config(tiny_run), shards["finetune"], tmp_path / "out", "--launcher", "local",
                     "--tasks-per-node", 2, "--submitit-dir", tmp_path / "submitit")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["processes"] == 2 and meta["samples_seen"] == 12
    tasks = exported(job_logs(tmp_path / "submitit"))
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in tasks] == [
        ("0", "0", "2", "2"), ("1", "1", "2", "2")]  # fmt: skip
    published = json.loads(next((tmp_path / "submitit").rglob("rendezvous-*.json")).read_text())
    assert {e["MASTER_PORT"] for e in tasks} == {str(published["port"])}


def test_two_task_job_on_slurm(slurm, tiny_run, shards, tmp_path):
    res = merv_train(config(tiny_run), shards["finetune"], tmp_path / "out", "--launcher", "slurm",
                     "--tasks-per-node", 2, "--partition", "debug", "--time", 10,
                     "--submitit-dir", tmp_path / "submitit", env=slurm)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["processes"] == 2
    job_id = next(p.name for p in (tmp_path / "submitit").iterdir() if p.name.isdigit())
    assert accounting(slurm, job_id, "State") == "COMPLETED"
    tasks = exported(job_logs(tmp_path / "submitit"))  # what default_workers and torch read, on both tasks
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in tasks] == [
        ("0", "0", "2", "2"), ("1", "1", "2", "2")]  # fmt: skip


def accounting(slurm: dict, job_id: str, fields: str) -> str:
    """``sacct`` ``fields`` of a job's allocation once it has ended (accounting trails the end by a few seconds)."""
    deadline = time.time() + 60
    while True:
        sacct = ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", f"State,{fields}"]
        state, _, values = subprocess.run(sacct, capture_output=True, text=True, env=slurm).stdout.strip().partition(
            "|")  # fmt: skip
        if state not in ("", "PENDING", "RUNNING") or time.time() > deadline:
            return state if fields == "State" else values
        time.sleep(1)


def test_a_job_submitted_from_inside_a_job_with_mem_gets_its_own_resources(slurm, tiny_run, shards, tmp_path):
    """A Snakemake job on the cluster submits the training job from inside its own Slurm job. That job asked for
    --mem: its SLURM_* variables must not reach the training job (whose srun would refuse the mix of memory
    variables); the training job runs as itself, with the CPUs and memory it asked for."""
    sub = tmp_path / "submitit"
    train = [sys.executable, "-m", "merv.cli", "train", "--config", config(tiny_run), "--stage", "finetune",
             "--data", str(shards["finetune"]), "--out", str(tmp_path / "out"), "--launcher", "slurm",
             "--tasks-per-node", "1", "--partition", "debug", "--time", "10", "--submitit-dir", str(sub)]  # fmt: skip
    script = tmp_path / "parent.sh"
    script.write_text("#!/bin/bash\nexec " + " ".join(f"'{a}'" for a in train) + "\n")
    parent = subprocess.run(["sbatch", "--parsable", "--wait", "-p", "debug", "-c", "1", "--mem=700M", "-t", "10",
                             "-o", str(tmp_path / "parent.log"), str(script)],
                            capture_output=True, text=True, env=slurm, timeout=900)  # fmt: skip
    parent_log = (tmp_path / "parent.log").read_text() if (tmp_path / "parent.log").exists() else ""
    assert parent.returncode == 0, parent.stderr + parent_log[-3000:] + job_logs(sub)[-3000:]
    parent_id = parent.stdout.strip().split(";")[0]
    child_id = next(p.name for p in sub.iterdir() if p.name.isdigit())
    assert child_id != parent_id
    assert accounting(slurm, parent_id, "AllocCPUS,ReqMem") == "1|700M"
    assert accounting(slurm, child_id, "AllocCPUS,ReqMem") == "1|1000M", "the cluster's DefMemPerCPU, for 1 CPU"
    assert f"job {child_id} on " in job_logs(sub), "the training task sees its own job"
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["step"] == 3


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
