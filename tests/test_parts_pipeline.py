"""Scatter–gather sharding and feature extraction through the real Snakemake: a split sharded in parts and its
features extracted in parts, each its own job; appending samples or replacing a video reruns only the parts (of
shards and features) they touch, and the gathered folder holds what one `merv shard` writes."""

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from merv.cli import parse_size
from merv.data.reader import read_manifest, sample_keys
from merv.data.shards import ShardSettings, collect_items, write_shards
from tests.test_pipeline import small_config, snakemake, write_config

pytestmark = pytest.mark.slow
TARGET = "data/shards/small/train/mine"


def feature_config(cfg: dict) -> dict:
    """``cfg`` with a model that trains on split ``mine`` from cached features of its one encoder (merv-tiny's vit,
    built weights) as the only selected one: `snakemake all_features` extracts that encoder over ``mine``."""
    stages = {"align": {"data": "mine"}, "finetune": {"data": "mine"}}
    cfg["models"]["feat"] = {
        "preset": "merv-tiny-appearance",
        "weights": "tiny",
        "overrides": {"train": {"stages": stages}},
    }
    cfg["pipeline"]["models"] = ["feat"]
    return cfg


def jobs_run(out: str) -> list[tuple[str, str]]:
    """``(rule, part)`` of every job a run executed (part empty for a job without that wildcard), in order."""
    ran = []
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", out):
        rule = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        if rule:
            part = re.search(r"^    wildcards: .*part=(part-\d+)", block, re.M)
            ran.append((rule[1], part[1] if part else ""))
    return ran


def members(folder: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            out.update({m.name: t.extractfile(m).read() for m in t})
    return out


def test_appending_samples_or_replacing_a_video_reruns_only_the_parts_they_touch(synth_dir, tmp_path, monkeypatch):
    cfg = feature_config(small_config())
    cfg["shards"].update(items_per_part=3, workers=1)  # one process a part: a worker pool costs more than 3 clips
    cfg["data"]["train"]["mine"] = {"json": "mine/train.json"}
    write_config(tmp_path, cfg)
    shutil.copytree(synth_dir / "train" / "videos", tmp_path / "mine" / "videos")
    samples = json.loads((synth_dir / "train" / "finetune.json").read_text())
    source = tmp_path / "mine" / "train.json"
    source.write_text(json.dumps(samples[:7]))

    def run(*args):
        res = snakemake(tmp_path, *args, TARGET, "all_features")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return jobs_run(res.stdout + res.stderr), res.stdout + res.stderr

    ran, _ = run()
    parts = [(rule, f"part-0000{k}") for k in range(3) for rule in ("shard_train_part", "extract_feature_part")]
    gathers = [("gather_train_shards", ""), ("gather_features", ""), ("all_features", "")]
    assert sorted(ran) == sorted([("plan_train_parts", ""), ("build_tiny_weights", ""), *parts, *gathers]), ran
    gathered = tmp_path / TARGET
    manifest = read_manifest(gathered)
    assert manifest["input"] == manifest["samples"] == 7 and len(manifest["parts"]) == 3

    # the gathered folder holds the samples of one `merv shard` run over the whole JSON, byte for byte
    shards = cfg["shards"]
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=parse_size(shards["target_size"]),
                             frame_format=shards["frame_format"], backend=shards["backend"])  # fmt: skip
    assert cfg["shards"]["sets"]["small"] == {"size": 64, "frames": [4, 8]}
    monkeypatch.chdir(tmp_path)  # as `merv shard mine/train.json` in the project: the same relative media paths
    write_shards(collect_items(Path("mine/train.json")), tmp_path / "one", settings)
    assert read_manifest(tmp_path / "one")["fingerprint"] == manifest["fingerprint"]
    assert sample_keys(tmp_path / "one") == sample_keys(gathered)
    assert members(tmp_path / "one") == members(gathered)

    first = tmp_path / "data/shards/small/parts/train/mine/part-00000"
    kept = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    source.write_text(json.dumps(samples[:10]))  # 3 appended: part 2 fills up, part 3 is new
    ran, _ = run()
    parts = [(rule, f"part-0000{k}") for k in (2, 3) for rule in ("shard_train_part", "extract_feature_part")]
    assert sorted(ran) == sorted([("plan_train_parts", ""), *parts, *gathers]), ran
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == kept, "part 0 untouched"
    assert read_manifest(gathered)["input"] == 10 and sample_keys(gathered)[:7] == sample_keys(tmp_path / "one")

    video = tmp_path / "mine" / samples[4]["video"]  # in part 1: another clip written over it, in place
    video.write_bytes((tmp_path / "mine" / samples[0]["video"]).read_bytes())
    ran, _ = run()
    parts = [("shard_train_part", "part-00001"), ("extract_feature_part", "part-00001")]
    assert sorted(ran) == sorted([*parts, *gathers]), ran
    sample = json.loads(members(gathered)[f"{samples[4]['id']}.json"])
    assert sample["frame_digests"] == json.loads(members(gathered)[f"{samples[0]['id']}.json"])["frame_digests"]

    ran, out = run("-n")
    assert "Nothing to be done" in out
