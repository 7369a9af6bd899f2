"""Scatter–gather sharding on the repository's real Slurm cluster: each part of a training split is its own Slurm job,
the gathered folder holds the bytes of one `merv shard` run, and a part killed in its job is the only one redone."""

import json
import os
import shutil
import signal
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


def shard_processes(workdir: Path) -> list[tuple[int, list[str]]]:
    """``(pid, argv)`` of the `merv shard` processes of part jobs running in ``workdir``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0")
            if any(a.endswith("/merv") for a in args) and "shard" in args and os.readlink(proc / "cwd") == str(workdir):
                found.append((int(proc.name), args))
        except (OSError, ValueError):
            continue
    return found


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

    # the first run: one part's process is killed inside its Slurm job (as the OOM killer or a crash ends it). Not
    # scancel: sacct then says "CANCELLED by <uid>", which the Slurm plugin (2.8.0) does not take for a failure, and
    # Snakemake waits for that job forever.
    cmd = ["python", "-m", "snakemake", "-s", str(REPO / "Snakefile"), *profile, TARGET]
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and run.poll() is None:
        for pid, args in shard_processes(tmp_path):
            os.kill(pid, signal.SIGKILL)
            killed = next(a for a in args if "part-" in a)
            break
        time.sleep(0.2)
    log, _ = run.communicate(timeout=900)
    assert killed is not None, log[-3000:]
    assert run.returncode != 0 and "Error in rule shard_train_part" in log, log[-3000:]
    jobs = [j for j in part_jobs(env) if j["JobID"] not in before]
    assert len(jobs) == 4, jobs  # every part its own Slurm job
    states = sorted(j["State"].split()[0] for j in jobs)
    assert states == ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED"], jobs
    failed = next(j for j in jobs if j["State"].startswith("FAILED"))
    part = failed["Comment"].rsplit("_", 1)[-1]  # the plugin's comment: rule_<rule>_wildcards_<values joined by _>
    assert part in killed, (part, killed)

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
