"""The frozen-encoder feature cache: training from it equals training on the fly; a stale or damaged cache is
refused; extraction resumes after a kill to the same bytes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merv.config import resolve_run_config
from merv.features.cache import FeatureCacheError, open_feature_sets
from merv.features.extract import ExtractSettings, extract_features
from merv.train.loop import train_stage
from merv.weights import resolve_model
from tests.conftest import tiny_overrides

FP32 = ExtractSettings(dtype="fp32", batch_size=5)


# The fusion's key bias shifts every encoder's score by the same q.b, which the softmax cancels: its gradient is zero
# up to rounding, and AdamW turns that noise into steps of about lr, so its values (~1e-6) are noise of two runs
# that round differently. Every other tensor must agree closely.
NOISE_ONLY = ("fusion.key.bias",)


def same_weights(a: torch.Tensor, b: torch.Tensor, name: str) -> bool:
    if name in NOISE_ONLY:
        return bool(a.abs().max() < 1e-4 and b.abs().max() < 1e-4)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def stage_run(tiny_run, **stage):
    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    stage = {"epochs": 2, "global_batch_size": 4, "micro_batch_size": 2, "num_workers": 0, **stage}
    overrides["train"] = {"stages": {"align": stage}}
    return resolve_run_config("merv-tiny", overrides)


@pytest.fixture(scope="module")
def caches(tiny_run, shards, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("features")
    model = resolve_model(tiny_run.model)
    for enc in model.encoders:
        manifest = extract_features(shards["align"], model, enc.id, out / enc.id, FP32)
        assert manifest["samples"] == 12 and manifest["features"] == 12
        assert manifest["key"]["pooling"] == {"pooling": "avgpool3d", "temporal_tokens": 4, "tokens_per_frame": 16}
        assert manifest["shape"] == [4 * 16, 64], "the pooled grid: 4 temporal x 16 spatial tokens of width 64"
    return {e.id: out / e.id for e in model.encoders}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cached", [("vit", "vivit"), ("vivit",)])
def test_training_from_the_cache_equals_training_on_the_fly(tiny_run, shards, caches, tmp_path, cached):
    """fp32 on CPU: the cached pooled grids are the very numbers the on-the-fly path computes, except that the
    encoders ran on batches of another size (matrix products summed in another order): losses and weights agree to
    about 1e-6 relative, so rtol 1e-4 leaves room and still catches any real difference (a wrong sample or layer
    moves the loss at the first decimal)."""
    run = stage_run(tiny_run)
    fly = train_stage(run, "align", shards["align"], tmp_path / "fly", progress=False)
    features = {e: caches[e] for e in cached}
    cache = train_stage(run, "align", shards["align"], tmp_path / "cache", progress=False, features=features)
    assert fly["step"] == cache["step"] == 6 and set(cache["data"]["feature_caches"]) == set(cached)
    assert losses(tmp_path / "fly") == pytest.approx(losses(tmp_path / "cache"), rel=1e-4)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("fly", "cache"))
    assert a.keys() == b.keys()
    for k in a:
        assert same_weights(a[k], b[k], k), k


def test_a_cache_of_other_settings_is_refused_naming_the_field(tiny_run, shards, caches, tmp_path):
    model = resolve_model(tiny_run.model)
    vit = dataclasses.replace(model.encoders[0], feature_layer=-2)
    other = dataclasses.replace(model, encoders=(vit, model.encoders[1]))
    with pytest.raises(FeatureCacheError, match=r"feature_layer: cache has None, the config needs -2"):
        open_feature_sets(other, shards["align"], {"vit": caches["vit"]})
    pooled = dataclasses.replace(model, projector=dataclasses.replace(model.projector, temporal_tokens=2))
    with pytest.raises(FeatureCacheError, match=r"pooling: cache has .*tokens': 4.*needs .*temporal_tokens': 2"):
        open_feature_sets(pooled, shards["align"], {"vivit": caches["vivit"]})
    with pytest.raises(FeatureCacheError, match="source_frames"):
        open_feature_sets(model, shards["finetune"], {"vit": caches["vit"]})  # another split's frames
    with pytest.raises(FeatureCacheError, match="no manifest.json"):
        open_feature_sets(model, shards["align"], {"vit": tmp_path})


def test_a_damaged_cache_file_is_refused(tiny_run, shards, caches, tmp_path):
    import shutil

    damaged = tmp_path / "vit"
    shutil.copytree(caches["vit"], damaged)
    import tarfile

    tar = sorted(damaged.glob("shard-*.tar"))[0]
    with tarfile.open(tar) as tf:
        feature = [m for m in tf.getmembers() if m.name.endswith(".vit.feat")][-1]
    data = bytearray(tar.read_bytes())
    data[feature.offset_data + feature.size - 3] ^= 0xFF  # one flipped bit pattern in the last feature array
    tar.write_bytes(bytes(data))
    run = stage_run(tiny_run)
    with pytest.raises(FeatureCacheError, match=rf"{tar}: sample .* do not match their recorded sha256"):
        train_stage(run, "align", shards["align"], tmp_path / "out", progress=False, features={"vit": damaged})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # extracts twice and kills a run
def test_killed_extraction_resumes_to_the_same_bytes(tiny_run, shards, tmp_path):
    cmd = [sys.executable, "-m", "merv.cli", "features", str(shards["finetune"]), "--config",
           json.dumps(tiny_run.to_dict()), "--encoder", "vivit", "--dtype", "bf16", "--batch-size", "1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "--out", str(cut)], stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (cut / "shard-000000.json").exists() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "manifest.json").exists(), "killed before the end"
    again = subprocess.run([*cmd, "--out", str(cut)], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already there" in again.stderr and " 0 already there" not in again.stderr
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in cut.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "full" / name).read_bytes() == (cut / name).read_bytes(), name
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (tmp_path / "full", cut))
    assert a["fingerprint"] == b["fingerprint"] and a["shards"] == b["shards"]


@pytest.mark.slow
def test_two_ranks_from_the_cache_equal_two_ranks_on_the_fly(tiny_run, synth_dir, tmp_path):
    """The cache is split to ranks like the shards it mirrors: 2 gloo ranks reading only the cache (no video shard)
    train the same weights as 2 ranks running the encoders on the frames. Shards of 4 samples: each rank's 6 samples
    start or end inside a shard, so the cache is joined from the middle of a shard too."""
    from merv.data.shards import ShardSettings, collect_items, read_manifest, write_shards

    shards = tmp_path / "fours"
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=500_000, frame_format="npy")
    write_shards(collect_items(synth_dir / "train" / "finetune.json"), shards, settings)
    assert [s["samples"] for s in read_manifest(shards)["shards"]] == [4, 4, 4]
    model = resolve_model(tiny_run.model)
    flags = []
    for enc in model.encoders:
        extract_features(shards, model, enc.id, tmp_path / enc.id, FP32)
        flags += ["--features", f"{enc.id}={tmp_path / enc.id}"]
    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    stage = {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 2, "shuffle_buffer": 0, "num_workers": 0}
    overrides["train"] = {"stages": {"align": stage}}
    config = json.dumps(resolve_run_config("merv-tiny", overrides).to_dict())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for name, extra in (("fly", []), ("cache", flags)):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "merv.cli", "train",
               "--config", config, "--stage", "align", "--data", str(shards), "--out", str(out), "--no-progress",
               *extra]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = (load_file(str(out / "model.safetensors")), json.loads((out / "meta.json").read_text()))
    (fly, meta_fly), (cache, meta_cache) = runs["fly"], runs["cache"]
    assert meta_cache["processes"] == 2 and meta_fly["step"] == meta_cache["step"] == 3
    assert meta_cache["samples_seen"] == 12 and set(meta_cache["data"]["feature_caches"]) == {"vit", "vivit"}
    assert losses(tmp_path / "fly") == pytest.approx(losses(tmp_path / "cache"), rel=1e-4)
    for k in fly:
        assert same_weights(fly[k], cache[k], k), k
