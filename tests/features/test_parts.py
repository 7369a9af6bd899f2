"""Scatter–gather feature extraction: part caches (of each shard part, or of shard ranges) gathered into one cache
hold the bytes of one extraction, training reads it as one, and parts that do not line up are refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merv.cli import main
from merv.data.parts import gather_parts, plan_parts
from merv.data.shards import ShardSettings, collect_items, read_manifest, write_shards
from merv.features.cache import FeatureCacheError, open_feature_sets
from merv.features.extract import ExtractSettings, extract_features, parse_shard_range
from merv.features.parts import gather_features
from merv.train.loop import train_stage
from merv.weights import resolve_model
from tests.features.test_features import losses, stage_run

NPY = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=300_000, frame_format="npy")
FP32 = ExtractSettings(dtype="fp32", batch_size=3)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def shard_in_parts(json_path: Path, root: Path, out: Path) -> tuple[list[Path], Path]:
    """A training JSON sharded scatter–gather (parts of 5 samples), as the pipeline does: the parts' shard folders
    and the gathered one."""
    plan = plan_parts(json_path, out / "plan", 5, root)
    parts = []
    for p in plan["parts"]:
        write_shards(collect_items(out / "plan" / f"{p}.json", root), out / "parts" / p, NPY, strict=False)
        parts.append(out / "parts" / p)
    gather_parts(parts, out / "gathered")
    return parts, out / "gathered"


@pytest.fixture(scope="module")
def split(synth_dir, tmp_path_factory):
    """14 samples (one text-only, one whose video is missing: quarantined) sharded in 3 parts and gathered; vit's
    features extracted in one job over the gathered folder."""
    tmp = tmp_path_factory.mktemp("feature-parts")
    samples = json.loads((synth_dir / "train" / "finetune.json").read_text())
    samples.insert(5, {"id": "text_only", "conversations": samples[0]["conversations"]})
    samples.insert(9, {**samples[1], "id": "missing", "video": "videos/missing.mp4"})
    (tmp / "train.json").write_text(json.dumps(samples))
    parts, gathered = shard_in_parts(tmp / "train.json", synth_dir / "train", tmp)
    assert read_manifest(gathered)["bad"] == 1 and len(parts) == 3
    return tmp, parts, gathered


@pytest.fixture(scope="module")
def model(tiny_run):
    return resolve_model(tiny_run.model)


@pytest.fixture(scope="module")
def one_job(split, model):
    tmp, _, gathered = split
    manifest = extract_features(gathered, model, "vit", tmp / "one", FP32)
    assert manifest["samples"] == 13 and manifest["features"] == 12 and len(manifest["shards"]) > 3
    return tmp / "one"


def test_parts_of_the_shard_parts_gather_to_the_bytes_of_one_extraction(split, model, one_job, tmp_path):
    _, parts, gathered = split
    caches = []
    for part in parts:  # the pipeline's parts: `merv features` over each shard part's own folder
        extract_features(part, model, "vit", tmp_path / part.name, FP32)
        caches.append(tmp_path / part.name)
    manifest = gather_features(caches, gathered, tmp_path / "gathered")
    assert files(tmp_path / "gathered") == files(one_job), "every file, the manifest and the indexes included"
    assert manifest == json.loads((one_job / "manifest.json").read_text())
    # the cache's tars are the parts' files (hard links), under the gathered shards' names
    last = read_manifest(caches[-1])["shards"][-1]["name"]
    assert (tmp_path / "gathered" / manifest["shards"][-1]["name"]).stat().st_ino == (caches[-1] / last).stat().st_ino
    gather_features(caches, gathered, tmp_path / "gathered")  # again, over the finished cache: the same bytes
    assert files(tmp_path / "gathered") == files(one_job)


def test_shard_ranges_of_a_folder_gather_to_the_bytes_of_one_extraction(split, model, one_job, tmp_path):
    _, _, gathered = split
    n = len(read_manifest(gathered)["shards"])
    ranges = [(0, 2), (2, 5), (5, 100)]  # a fixed step whose last part passes the end
    caches = [tmp_path / f"range-{lo}" for lo, _ in ranges]
    for rng, cache in zip(ranges, caches, strict=True):
        part = extract_features(gathered, model, "vit", cache, FP32, shard_range=rng)
        assert part["range"] == {"shards": [rng[0], min(rng[1], n)], "of": n}
    with pytest.raises(FeatureCacheError, match=r"only a part of a feature cache \(shards 2 to 4 of .*gather-features"):
        open_feature_sets(model, gathered, {"vit": caches[1]})
    stamps = {p: p.stat().st_mtime_ns for p in caches[1].glob("shard-*")}
    extract_features(gathered, model, "vit", caches[1], FP32, shard_range=ranges[1])  # a finished part: kept
    assert {p: p.stat().st_mtime_ns for p in caches[1].glob("shard-*")} == stamps
    gather_features(caches, gathered, tmp_path / "gathered")
    assert files(tmp_path / "gathered") == files(one_job)


def test_training_reads_a_gathered_cache_as_it_reads_a_one_job_cache(split, model, one_job, tiny_run, tmp_path):
    _, parts, gathered = split
    caches = []
    for part in parts:
        extract_features(part, model, "vit", tmp_path / part.name, FP32)
        caches.append(tmp_path / part.name)
    gather_features(caches, gathered, tmp_path / "cache")
    run = stage_run(tiny_run, epochs=1)
    results = {}
    for name, cache in (("one", one_job), ("gathered", tmp_path / "cache")):
        meta = train_stage(run, "align", gathered, tmp_path / name, progress=False, features={"vit": cache})
        results[name] = losses(tmp_path / name), load_file(str(tmp_path / name / "model.safetensors")), meta
    (loss_one, weights_one, meta_one), (loss_gathered, weights_gathered, meta) = results["one"], results["gathered"]
    assert meta["samples_seen"] == meta_one["samples_seen"] and set(meta["data"]["feature_caches"]) == {"vit"}
    assert meta["data"] == meta_one["data"], "the same cache fingerprint recorded"
    assert loss_one == loss_gathered, "the same bytes read the same way: the same numbers, not merely close ones"
    assert all(torch.equal(weights_one[k], weights_gathered[k]) for k in weights_one)


def test_gathering_refuses_parts_that_do_not_line_up_naming_them(split, model, synth_dir, tmp_path, capsys):
    tmp, parts, gathered = split
    caches = []
    for part in parts:
        extract_features(part, model, "vit", tmp_path / part.name, FP32)
        caches.append(tmp_path / part.name)
    with pytest.raises(FeatureCacheError, match=r"the parts hold \d+ cache shards, .*gathered has \d+ \(a part"):
        gather_features(caches[:2], gathered, tmp_path / "out")
    with pytest.raises(FeatureCacheError, match=r"part-00001/shard-000000.tar \(for shard-0+\d.tar .*other samples"):
        gather_features([caches[1], caches[0], caches[2]], gathered, tmp_path / "out")
    fp16 = tmp_path / "fp16"
    extract_features(parts[1], model, "vit", fp16, ExtractSettings(dtype="fp16"))
    with pytest.raises(FeatureCacheError, match=r"fp16 was extracted with other settings .*differ: \['dtype'\]"):
        gather_features([caches[0], fp16, caches[2]], gathered, tmp_path / "out")

    # a stale part: extracted before one of its videos was replaced (the same keys and shard boundaries)
    samples = json.loads((tmp / "plan" / "part-00001.json").read_text())
    root = tmp_path / "root"
    (root / "videos").mkdir(parents=True)
    videos = [s["video"] for s in samples if "video" in s]
    for video in videos:  # the second one is the first one's clip (a missing video stays missing)
        (root / video).symlink_to(synth_dir / "train" / (videos[0] if video == videos[1] else video))
    (tmp_path / "stale.json").write_text(json.dumps(samples))
    write_shards(collect_items(tmp_path / "stale.json", root), tmp_path / "stale-shards", NPY, strict=False)
    extract_features(tmp_path / "stale-shards", model, "vit", tmp_path / "stale", FP32)
    with pytest.raises(FeatureCacheError, match=r"stale/shard-000000.tar .*made from other frames than that shard"):
        gather_features([caches[0], tmp_path / "stale", caches[2]], gathered, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists(), "a failed gather leaves no finished-looking cache"

    # the command line: one line naming the problem, exit code 1
    assert main(["gather-features", str(caches[0]), "--shards", str(gathered), "--out", str(tmp_path / "cli")]) == 1
    assert "merv gather-features: error: " in capsys.readouterr().err


def test_shard_ranges_are_parsed_or_refused_with_the_expected_form():
    assert parse_shard_range("0:100") == (0, 100) and parse_shard_range("200:") == (200, None)
    assert parse_shard_range(":3") == (0, 3)
    for bad in ("5", "3:3", "4:2", "-1:2", "a:b"):
        with pytest.raises(ValueError, match=rf"shard range {bad!r}: expected A:B with 0 <= A < B"):
            parse_shard_range(bad)
