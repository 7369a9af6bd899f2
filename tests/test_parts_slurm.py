"""Scatter–gather sharding on the repository's real Slurm cluster: each part of a training split is its own Slurm job,
the gathered folder holds the bytes of one `merv shard` run, and a part killed by Slurm is the only one redone."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from merv.data.reader import read_manifest, sample_keys
from merv.data.shards import ShardSettings, collect_items, write_shards
from tests.test_parts_pipeline import TARGET, jobs_run, members
from tests.test_slurm_profile import REPO, sacct, small_config, snakemake

pytestmark = pytest.mark.slow


def part_jobs(env: dict) -> list[dict]:
    jobs = sacct(env, "JobID", "State", "Comment")
    return [j for j in jobs if j["Comment"].startswith("rule_shard_train_part_wildcards_small_mine_part-")]


def test_parts_are_slurm_jobs_gathered_to_the_one_piece_bytes_and_a_killed_part_reruns_alone(
    slurm, synth_dir, tmp_path, monkeypatch
):
    cfg = small_config()
    cfg["shards"].update(items_per_part=3, workers=1)
    cfg["data"]["train"]["mine"] = {"json": "mine/train.json"}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copytree(synth_dir / "train" / "videos", tmp_path / "mine" / "videos")
    samples = json.loads((synth_dir / "train" / "finetune.json").read_text())
    (tmp_path / "mine" / "train.json").write_text(json.dumps(samples[:12]))  # 4 parts
    env = dict(slurm, OMP_NUM_THREADS="1")
    profile = ["--profile", str(REPO / "profiles" / "slurm"), "--keep-going"]
    before = {j["JobID"] for j in part_jobs(env)}

    # the first run: one part's Slurm job is cancelled while it runs (as a node failure or a preemption would end it)
    cmd = ["python", "-m", "snakemake", "-s", str(REPO / "Snakefile"), *profile, TARGET]
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and run.poll() is None:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True, env=env).stdout
        running = [line.split("|") for line in out.splitlines() if "shard_train_part" in line and "|RUNNING|" in line]
        if running:
            killed = running[0]
            subprocess.run(["scancel", killed[0]], env=env, check=True)
        time.sleep(0.5)
    log, _ = run.communicate(timeout=900)
    assert killed is not None, log[-3000:]
    assert run.returncode != 0 and "Error in rule shard_train_part" in log, log[-3000:]
    jobs = [j for j in part_jobs(env) if j["JobID"] not in before]
    assert len(jobs) == 4, jobs  # every part its own Slurm job
    states = sorted(j["State"].split()[0] for j in jobs)
    assert states == ["CANCELLED", "COMPLETED", "COMPLETED", "COMPLETED"], jobs
    cancelled = next(j for j in jobs if j["State"].startswith("CANCELLED"))
    part = cancelled["Comment"].rsplit("_", 1)[-1]  # the plugin's comment: rule_<rule>_wildcards_<values joined by _>

    # the rerun redoes that part alone, then gathers
    res = snakemake(tmp_path, env, *profile, TARGET, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert sorted(jobs_run(out)) == [("gather_train_shards", ""), ("shard_train_part", part)], (part, jobs_run(out))
    assert len([j for j in part_jobs(env) if j["JobID"] not in before]) == 5

    # the gathered folder: the samples of one `merv shard` of the whole JSON, byte for byte
    shards = cfg["shards"]
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=200_000, frame_format=shards["frame_format"],
                             backend=shards["backend"])  # fmt: skip
    assert shards["target_size"] == "200KB" and shards["sets"]["small"] == {"size": 64, "frames": [4, 8]}
    monkeypatch.chdir(tmp_path)
    write_shards(collect_items(Path("mine/train.json")), tmp_path / "one", settings)
    gathered = tmp_path / TARGET
    assert read_manifest(gathered)["samples"] == 12 and len(read_manifest(gathered)["parts"]) == 4
    assert sample_keys(tmp_path / "one") == sample_keys(gathered)
    assert members(tmp_path / "one") == members(gathered)
