"""The README's cluster command on the repository's real Slurm cluster: the miniature of the paper's DAG, every job a
Slurm job, training stages submitted by submitit, GPUs (fake ones, declared as GRES) allocated as the profile asks."""

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tests.helpers import snakemake as run_snakemake

pytestmark = pytest.mark.slow
# the target goes before --configfile, which takes every following word as a config file
COMMAND = ["--profile", "slurm", "results/merv_full/eval.json", "--configfile", "config/miniature.yaml"]


def small_config() -> dict:
    """The default config on a few synthetic clips; training stages go to Slurm through submitit on one fake GPU."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["synth"].update(train_videos=16, eval_videos=4)
    cfg["shards"]["target_size"] = "200KB"
    cfg["launch"].update(launcher="slurm", partition="debug", gpus_per_node=1, time_min=10)
    cfg["eval"]["batch_size"] = 4
    return cfg


def sacct(env: dict, *fields: str) -> list[dict]:
    """Every job of the cluster (allocations, not steps) with ``fields``."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-a", "-S", "now-1days", "-o", ",".join(fields)],
                         capture_output=True, text=True, env=env, check=True).stdout  # fmt: skip
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()]


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    """`make slurm-profile`, then the miniature through `--profile slurm`, as the README says; timed."""
    workdir = tmp_path_factory.mktemp("slurm-run")
    (workdir / "config").mkdir()
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(small_config()))
    (workdir / "config" / "miniature.yaml").write_text((REPO / "config" / "miniature.yaml").read_text())
    env = dict(slurm, XDG_CONFIG_HOME=str(workdir / "xdg"), OMP_NUM_THREADS="1")
    make = subprocess.run(["make", "-C", str(REPO), "slurm-profile"], capture_output=True, text=True, env=env)
    assert make.returncode == 0, make.stderr
    start = time.time()
    res = snakemake(workdir, env, *COMMAND)
    elapsed = time.time() - start
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    print(f"miniature through the Slurm profile: {elapsed:.0f} s")
    return workdir, env, res.stdout + res.stderr


def test_every_job_ran_on_slurm_and_the_result_is_there(slurm_run):
    workdir, env, log = slurm_run
    result = json.loads((workdir / "results" / "merv_full" / "eval.json").read_text())
    assert set(result["benchmarks"]) == {"synth_mcq", "synth_open"} and result["benchmarks"]["synth_mcq"]["n"] == 4
    jobs = sacct(env, "JobID", "JobName", "State", "Comment", "AllocTRES", "WorkDir")
    by_rule = {}
    for job in jobs:  # this run's jobs (the cluster's accounting also holds other tests' jobs)
        if job["Comment"].startswith("rule_") and Path(job["WorkDir"]) == workdir:
            rule = job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
            by_rule.setdefault(rule, []).append(job)
    # (planning parts and gathering them are local rules: no Slurm job)
    expected = {"synth_dataset": 1, "build_tiny_weights": 1, "shard_train_part": 2, "shard_benchmark": 2,
                "train_stage": 2, "eval_benchmark": 2, "merge_eval": 2, "collect_eval": 1,
                "collect_seeds": 1}  # fmt: skip
    assert {rule: len(js) for rule, js in by_rule.items()} == expected, jobs
    assert all(j["State"] == "COMPLETED" for js in by_rule.values() for j in js), jobs
    # the profile's per-rule resources reached Slurm: GPUs for evaluation, CPUs for sharding
    assert all("gres/gpu=1" in j["AllocTRES"] for j in by_rule["eval_benchmark"])
    assert all("cpu=2" in j["AllocTRES"] for j in by_rule["shard_train_part"] + by_rule["shard_benchmark"])
    # train_stage only submits: submitit's own jobs trained, one per stage, each with launch.gpus_per_node GPUs
    assert all("gres/gpu" not in j["AllocTRES"] for j in by_rule["train_stage"])
    submitit = workdir / "results" / "merv_full" / "seed-0" / "submitit"
    submitted = sorted(p.name for p in submitit.iterdir() if p.name.isdigit())
    trainers = [j for j in jobs if j["JobID"] in submitted]
    assert len(trainers) == 2 and all(j["State"] == "COMPLETED" and "gres/gpu=1" in j["AllocTRES"] for j in trainers)
    for stage in ("align", "finetune"):
        seed_dir = workdir / "results" / "merv_full" / "seed-0"
        meta = json.loads((seed_dir / "train" / stage / "meta.json").read_text())
        assert meta["stage"] == stage and (seed_dir / "logs" / f"train_{stage}.log").is_file()


def test_second_run_plans_nothing(slurm_run):
    workdir, env, _ = slurm_run
    before = len(sacct(env, "JobID"))
    res = snakemake(workdir, env, "-n", *COMMAND, timeout=300)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]
    assert len(sacct(env, "JobID")) == before


def test_failed_job_shows_its_log(slurm_run):
    """A job that fails inside Slurm fails the run, and Snakemake prints the rule's log."""
    workdir, env, _ = slurm_run
    cfg = small_config()
    cfg["data"]["train"]["broken"] = {"json": "missing/train.json"}
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (workdir / "missing").mkdir()
    (workdir / "missing" / "broken.mp4").write_bytes(b"not an mp4" * 100)
    sample = {"id": "b1", "video": "broken.mp4", "conversations": [{"from": "human", "value": "<video>\nHi"}]}
    (workdir / "missing" / "train.json").write_text(json.dumps([sample]))
    try:
        res = snakemake(workdir, env, "--profile", "slurm", "data/shards/small/train/broken", timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "Error in rule shard_train_part" in out, out[-3000:]
        log = "results/logs/shard_train_part_small_broken_part-00000.log"
        assert log in out and "cannot read video missing/broken.mp4" in out, out[-3000:]
    finally:
        (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(small_config()))


def snakemake(workdir: Path, env: dict, *args: str, timeout: int = 1200):
    """`snakemake ARGS` as a user runs it in the project folder, the cores left to the profile."""
    return run_snakemake(workdir, *args, cores=None, env=env, timeout=timeout)
