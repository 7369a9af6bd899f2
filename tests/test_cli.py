"""The `merv` command line as users and Snakemake call it: real subprocesses."""

import json
import shutil
import subprocess
import sys

import pytest


def merv(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "merv.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("delete", "file not found"), ("empty", "empty"), ("garbage", "not a decodable video")],
)
def test_strict_shard_stops_on_bad_video_with_a_clear_error(synth_dir, tmp_path, damage, reason):
    data = tmp_path / "data"
    shutil.copytree(synth_dir / "train", data)
    victim = data / "videos" / "train_00003.mp4"
    if damage == "delete":
        victim.unlink()
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        victim.write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing sensible" * 20)
    args = ["shard", data / "finetune.json", "--out", tmp_path / "out", "--frames", 4, "--size", 32, "--no-progress"]
    res = merv(*args, "--strict")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert f"cannot read video {victim}: " in res.stderr and reason in res.stderr
    assert merv(*args).returncode == 1, "strict is the default (shards.strict)"
    # with --no-strict the bad video is quarantined and the run succeeds with a summary
    res = merv(*args, "--no-strict")
    assert res.returncode == 0, res.stderr
    assert "12 items: 11 good, 1 bad" in res.stderr
    (line,) = (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()
    assert json.loads(line)["source"] == str(victim)


def test_shard_and_inspect(synth_dir, tmp_path):
    res = merv(
        "shard", synth_dir / "eval_data" / "synth_mcq", "--out", tmp_path / "mcq", "--frames", 4, 8, "--size", 64,
        "--shard-size", "20KB", "--workers", 2,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = merv("inspect", tmp_path / "mcq")
    summary = json.loads(res.stdout)
    assert summary["samples"] == 6 and summary["num_shards"] > 1
    res = merv("inspect", tmp_path / "mcq", "--sample", "nope")
    assert res.returncode == 1 and "no sample with key 'nope'" in res.stderr
    res = merv("shard", synth_dir, "--out", tmp_path / "x", "--frames", 4, "--size", 32, "--shard-size", "lots")
    assert res.returncode == 2 and "not a size: 'lots'" in res.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    res = merv("train", "--config", "merv-huge", "--stage", "align", "--data", tmp_path, "--out", tmp_path / "o")
    assert res.returncode == 1 and "Traceback" not in res.stderr and "presets: ['dinov2-single'" in res.stderr


def test_generate_cli(tiny_model, tiny_run, synth_dir, tmp_path):
    from merv.checkpoint import save_checkpoint

    save_checkpoint(tiny_model, tiny_run, tmp_path / "ckpt", {"trained_groups": ["projectors", "fusion"]})
    video = synth_dir / "eval_data" / "synth_open" / "videos" / "eval_00001.mp4"
    res = merv(
        "generate",
        "--model",
        tmp_path / "ckpt",
        "--video",
        video,
        "--prompt",
        "What colour?",
        "--max-new-tokens",
        3,
    )
    assert res.returncode == 0, res.stderr
    res = merv("generate", "--model", tmp_path / "ckpt", "--video", tmp_path / "missing.mp4", "--prompt", "x")
    assert res.returncode == 1 and "missing.mp4: file not found" in res.stderr


def test_generate_on_awkward_videos(tiny_model, tiny_run, tmp_path):
    """Rotated, odd-sized, 4:4:4, variable frame rate, very short or long: merv generate answers on each."""
    from merv.checkpoint import save_checkpoint
    from tests.media import gradient_frames, write_video

    save_checkpoint(tiny_model, tiny_run, tmp_path / "ckpt", {"trained_groups": ["projectors", "fusion"]})
    videos = [
        write_video(tmp_path / "rotated_odd.mp4", gradient_frames(12, 45, 67), pix_fmt="yuv444p", rotation=90),
        write_video(tmp_path / "vfr.mp4", gradient_frames(5, 40, 40), times=[0, 0.1, 0.5, 2.0, 2.1]),
        write_video(tmp_path / "long.mp4", gradient_frames(600, 36, 64), fps=30),
    ]
    for video in videos:
        res = merv("generate", "--model", tmp_path / "ckpt", "--video", video, "--prompt", "Hi", "--max-new-tokens", 2)
        assert res.returncode == 0, (video.name, res.stderr[-2000:])
