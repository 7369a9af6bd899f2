"""Scatter–gather sharding and feature extraction on the repository's real Slurm cluster: each part of a training
split is its own Slurm job, and so is the extraction of each part's features (on a GPU); the gathered folder holds the
bytes of one `merv shard` run, the gathered cache those of one `merv features` run, and a part killed in its job is
the only one redone (its shards, then its features)."""

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
from merv.pipeline import model_run
from tests.test_parts_pipeline import TARGET, feature_config, jobs_run, members
from tests.test_slurm_profile import REPO, sacct, small_config, snakemake

pytestmark = pytest.mark.slow
PARTS = [f"part-0000{k}" for k in range(4)]


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


def part_jobs(env: dict, rule: str = "shard_train_part") -> list[dict]:
    """The cluster's jobs of one part rule on split ``mine`` (the plugin's comment: rule_<rule>_wildcards_<values
    joined by _>, the part last)."""
    jobs = sacct(env, "JobID", "State", "Comment", "AllocTRES")
    prefix = {"shard_train_part": "small_mine_", "extract_feature_part": "feat_mine-vit-"}[rule]
    return [j for j in jobs if j["Comment"].startswith(f"rule_{rule}_wildcards_{prefix}")]


def test_parts_are_slurm_jobs_gathered_to_the_one_piece_bytes_and_a_killed_part_reruns_alone(
    slurm, synth_dir, tmp_path, monkeypatch
):
    cfg = feature_config(small_config())
    cfg["shards"].update(items_per_part=3, workers=1)
    cfg["data"]["train"]["mine"] = {"json": "mine/train.json"}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copytree(synth_dir / "train" / "videos", tmp_path / "mine" / "videos")
    samples = json.loads((synth_dir / "train" / "finetune.json").read_text())
    (tmp_path / "mine" / "train.json").write_text(json.dumps(samples[:12]))  # 4 parts
    env = dict(slurm, OMP_NUM_THREADS="1")
    # the repository's profile, but a shard part on one CPU (it shards with one worker here): two jobs side by side
    # on the 2-CPU node instead of one, which roughly halves this test
    settings = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    settings["set-resources"]["shard_train_part"]["cpus_per_task"] = 1
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(settings))
    profile = ["--profile", str(tmp_path / "profile"), "--keep-going"]
    targets = [TARGET, "all_features"]  # the split's shards, and vit's features over it (model feat's cache)
    before = {j["JobID"] for j in part_jobs(env) + part_jobs(env, "extract_feature_part")}

    # the first run: one part's process is killed inside its Slurm job (as the OOM killer or a crash ends it). Not
    # scancel: sacct then says "CANCELLED by <uid>", which the Slurm plugin (2.8.0) does not take for a failure, and
    # Snakemake waits for that job forever.
    cmd = ["python", "-m", "snakemake", "-s", str(REPO / "Snakefile"), *profile, *targets]
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
    part = failed["Comment"].rsplit("_", 1)[-1]
    assert part in killed, (part, killed)
    # the other parts' features were extracted meanwhile, each in its own job; the killed part's could not start
    features = [j for j in part_jobs(env, "extract_feature_part") if j["JobID"] not in before]
    assert sorted(j["Comment"].rsplit("_", 1)[-1] for j in features) == [p for p in PARTS if p != part], features

    # the rerun redoes that part alone (its shards, then its features), then gathers both
    res = snakemake(tmp_path, env, *profile, *targets, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert sorted(jobs_run(out)) == sorted([("shard_train_part", part), ("extract_feature_part", part),
                                            ("gather_train_shards", ""), ("gather_features", ""),
                                            ("all_features", "")]), (part, jobs_run(out))  # fmt: skip
    assert len([j for j in part_jobs(env) if j["JobID"] not in before]) == 5
    features = [j for j in part_jobs(env, "extract_feature_part") if j["JobID"] not in before]
    assert sorted(j["Comment"].rsplit("_", 1)[-1] for j in features) == PARTS, features  # each part its own job
    assert all(j["State"] == "COMPLETED" and "gres/gpu=1" in j["AllocTRES"] for j in features), features

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

    # the gathered cache: the bytes of one `merv features` over the gathered split, as the one-job rule ran it
    feat = model_run(cfg, "feat")
    config = json.dumps({"model": feat.to_dict()["model"]}, sort_keys=True)
    compute = ["--threads", str(cfg["compute"]["threads"]), "--isa", cfg["compute"]["isa"]]
    one = ["merv", "features", TARGET, "--config", config, "--encoder", "vit", "--dtype", feat.train.feature_dtype,
           "--out", "one-features", *compute, "--no-progress"]  # fmt: skip
    res = subprocess.run(one, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (cache,) = (tmp_path / "data" / "features" / "feat").glob("mine-vit-*")
    assert json.loads((cache / "manifest.json").read_text())["samples"] == 12
    names = sorted(p.name for p in (tmp_path / "one-features").iterdir())
    assert names == sorted(p.name for p in cache.iterdir() if p.name != ".snakemake_timestamp")
    assert "manifest.json" in names and len(names) == 2 * len(read_manifest(gathered)["shards"]) + 1
    for name in names:
        assert (cache / name).read_bytes() == (tmp_path / "one-features" / name).read_bytes(), name
