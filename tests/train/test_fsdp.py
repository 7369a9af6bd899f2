"""FSDP2 on 2 CPU processes (gloo) trains the same model as 1 process on the same global batches."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merv.config import resolve_run_config
from merv.data.shards import ShardSettings, collect_items, read_manifest, write_shards
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs(synth_dir, tiny_run, tmp_path_factory):
    """24 samples (the 12 training clips twice) in shards of exactly 2 samples."""
    out = tmp_path_factory.mktemp("pairs")
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=250_000, frame_format="npy")
    write_shards(collect_items(synth_dir / "train" / "finetune.json") * 2, out, settings)
    assert [s["samples"] for s in read_manifest(out)["shards"]] == [2] * 12
    return out


def one_process_order(folder: Path, dest: Path, seed: int, world: int, per_rank_step: int) -> Path:
    """The shards of ``folder`` (linked) under a manifest that makes one process read, in epoch 0, exactly the global
    batches ``world`` ranks read from ``folder``: each rank takes a contiguous range of the shuffled shard order,
    and a step takes the next ``per_rank_step`` samples of every rank, in rank order. The loader shuffles the
    manifest with ``Random(seed)``: a fixed permutation of positions, inverted here."""
    manifest = read_manifest(folder)
    shards = manifest["shards"]
    n, per_shard = len(shards), shards[0]["samples"]
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    shuffled = [shards[p] for p in perm]
    ranks = [shuffled[r * n // world : (r + 1) * n // world] for r in range(world)]
    k = per_rank_step // per_shard
    wanted = [s for step in range(n // world // k) for rank in ranks for s in rank[step * k : (step + 1) * k]]
    order = [None] * n
    for i, p in enumerate(perm):
        order[p] = wanted[i]
    dest.mkdir()
    for shard in shards:
        os.link(folder / shard["name"], dest / shard["name"])
    (dest / "manifest.json").write_text(json.dumps({**manifest, "shards": order}))
    return dest


def config(tiny_run, **stage) -> str:
    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    stage = {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 2, "shuffle_buffer": 0, "lr": 1e-3, **stage}
    overrides["train"] = {"stages": {"finetune": stage}}
    return json.dumps(resolve_run_config("merv-tiny", overrides).to_dict())


def train(cfg: str, data, out, nproc: int):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m"] if nproc > 1 else [
        sys.executable, "-m"]  # fmt: skip
    cmd = launcher + ["merv.cli", "train", "--config", cfg, "--stage", "finetune", "--data", str(data)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [*cmd, "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(Path(out) / "model.safetensors")), json.loads((Path(out) / "meta.json").read_text())


@pytest.mark.parametrize(
    ("mode", "global_batch", "loss_logits"),
    [("full_shard", 4, "targets"), ("shard_grad_op", 4, "targets"), ("full_shard", 8, "all")],
)
def test_two_ranks_equal_one_process(tiny_run, pairs, tmp_path, mode, global_batch, loss_logits):
    """Global batch 8 gives each rank 2 micro-steps a step: gradients are reduced after the last one only. The one
    process reads the same global batches as the two ranks (see one_process_order)."""
    cfg = config(tiny_run, fsdp=mode, global_batch_size=global_batch, loss_logits=loss_logits, epochs=1)
    seed = json.loads(cfg)["train"]["seed"]
    same_batches = one_process_order(pairs, tmp_path / "ordered", seed, world=2, per_rank_step=global_batch // 2)
    one, meta_one = train(cfg, same_batches, tmp_path / "one", 1)
    two, meta_two = train(cfg, pairs, tmp_path / "two", 2)
    assert meta_two["processes"] == 2 and meta_one["step"] == meta_two["step"] == 24 // global_batch
    assert meta_one["samples_seen"] == meta_two["samples_seen"] == 24
    assert one.keys() == two.keys() and {k.split(".")[0] for k in one} == {"projectors", "fusion", "llm"}
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), k
    assert abs(meta_one["final_loss"] - meta_two["final_loss"]) < 1e-4


def test_bf16_and_activation_checkpointing_on_two_ranks(tiny_run, pairs, tmp_path):
    cfg = config(tiny_run, mixed_precision="bf16", activation_checkpointing=True)
    state, meta = train(cfg, pairs, tmp_path / "bf16", 2)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values()), "fp32 master weights"
    assert meta["step"] == 6  # 24 samples, global batch 4


@pytest.fixture(scope="module")
def mixed(synth_dir, tmp_path_factory):
    """A Video-LLaVA style stage-2 JSON mixing video, image and text-only samples (a run of text-only samples, as
    LLaVA-665k has, so that whole micro-batches have no video), sharded with nothing quarantined."""
    from PIL import Image

    from merv.data.synth import COLOURS, render, sample_clip

    root = tmp_path_factory.mktemp("mixed")
    videos = json.loads((synth_dir / "train" / "finetune.json").read_text())[:8]
    for v in videos:
        v["video"] = str(synth_dir / "train" / v["video"])
    images = []
    for i in range(4):
        clip = sample_clip(random.Random(i), f"img{i}", 64, 12)
        Image.fromarray(render(clip, 64, 4, 12)[0]).save(root / f"img{i}.png")
        question = {"from": "human", "value": "<image>\nWhat colour is the shape?"}
        turns = [question, {"from": "gpt", "value": clip.colour}]
        images.append({"id": f"img{i}", "image": f"img{i}.png", "conversations": turns})
    texts = [
        {
            "id": f"text{i}",
            "conversations": [
                {"from": "human", "value": f"Name colour number {i}."},
                {"from": "gpt", "value": list(COLOURS)[i % 4]},
            ],
        }  # fmt: skip
        for i in range(6)
    ]
    (root / "train.json").write_text(json.dumps(videos[:4] + texts + images + videos[4:]))
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=250_000, frame_format="npy")
    summary = write_shards(collect_items(root / "train.json"), root / "shards", settings)
    assert summary.bad == 0 and summary.good == 18
    manifest = read_manifest(root / "shards")
    assert manifest["by_modality"] == {"image": 4, "text": 6, "video": 8}
    return root / "shards"


def test_text_only_image_and_video_samples_train_under_two_ranks(tiny_run, mixed, tmp_path):
    from merv.data.loader import ShardLoader

    # the scenario is real: some rank gets micro-batches without any video (the model then still runs its visual
    # path, with weight 0, so that FSDP's collectives line up across ranks)
    text_only = 0
    for rank in range(2):
        loader = ShardLoader(mixed, lambda s: s["frames"] is None, lambda b: b, 2, shuffle_buffer=0, rank=rank,
                             world_size=2)  # fmt: skip
        text_only += sum(all(batch) for batch in loader.epoch(0))
    assert text_only >= 1
    cfg = config(tiny_run, epochs=2, num_workers=1)
    state, meta = train(cfg, mixed, tmp_path / "mixed", 2)
    assert meta["processes"] == 2 and meta["samples_seen"] >= 16 and math.isfinite(meta["final_loss"])
    assert all(torch.isfinite(t).all() for t in state.values())
