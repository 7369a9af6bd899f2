"""The `merv` command line as users and Snakemake call it: real subprocesses."""

import json
import shutil
import subprocess
import sys

import pytest


def merv(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "merv", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
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
    if damage == "delete":
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


@pytest.mark.slow  # loads and runs a model per video
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
    # what it prints is the model's answer: the Python API's on the same checkpoint, video and prompt
    from merv.api import load_vid

    model = load_vid(tmp_path / "ckpt", device="cpu", dtype="fp32")
    builder = model.get_prompt_builder()
    builder.add_turn("human", "What colour?")
    expected = model.generate(video, builder.get_prompt(), max_new_tokens=3)
    assert expected.strip() and res.stdout == expected + "\n"
    assert len(model.tokenizer(expected, add_special_tokens=False)["input_ids"]) <= 3
    res = merv("generate", "--model", tmp_path / "ckpt", "--video", tmp_path / "missing.mp4", "--prompt", "x")
    assert res.returncode == 1 and "missing.mp4: file not found" in res.stderr


@pytest.mark.slow  # loads and runs a model per video
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


def test_python_m_merv_and_version():
    """`python -m merv` is the command line; --version prints the package's version (pyproject reads it too)."""
    import merv as package

    res = merv("--version")
    assert res.returncode == 0 and res.stdout == f"merv {package.__version__}\n"
    res = merv("--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: merv ") and "fetch-weights" in res.stdout


def test_verbosity_is_accepted_before_and_after_every_subcommand():
    from merv.cli import build_parser

    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    for name, sub in subcommands.items():
        assert {"-v", "--verbose", "-q", "--quiet"} <= set(sub._option_string_actions), name
    plain = ["synth", "--out", "x"]
    assert (parser.parse_args(plain).verbose, parser.parse_args(plain).quiet) == (False, False)
    for argv in (["-v", *plain], [*plain, "-v"], ["--verbose", *plain], [*plain, "--verbose"]):
        assert parser.parse_args(argv).verbose, argv
    for argv in (["-q", *plain], [*plain, "-q"], ["--quiet", *plain], [*plain, "--quiet"]):
        args = parser.parse_args(argv)
        assert args.quiet and not args.verbose, argv


def test_verbose_and_quiet_change_what_a_command_prints(tmp_path):
    """-q: nothing but warnings and errors; -v (either side of the subcommand): the traceback of an error."""
    args = ["synth", "--out", tmp_path / "d", "--train-videos", 1, "--eval-videos", 1, "--size", 32, "--frames", 4]
    res = merv(*args)
    assert res.returncode == 0 and "wrote synthetic dataset" in res.stderr
    res = merv(*args, "-q")
    assert res.returncode == 0 and res.stderr == "" and res.stdout == ""
    missing = tmp_path / "nowhere"
    res = merv("inspect", missing)
    assert res.returncode == 1 and "Traceback" not in res.stderr and str(missing) in res.stderr
    res = merv("inspect", missing, "-v")  # before the name: test_verbosity_is_accepted_before_and_after...
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_verbose_and_quiet_exclude_each_other(capsys):
    from merv.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["-v", "synth", "--out", "x", "-q"])
    assert stop.value.code == 2 and "-v/--verbose and -q/--quiet exclude each other" in capsys.readouterr().err


def test_fetch_weights_shows_download_progress_unless_quiet(tmp_path):
    """The hub's progress bars were switched off for every command; a download shows them again, -q hides them."""
    import os

    from merv.config import resolve_run_config
    from merv.fetch import weight_parts
    from tests.hub import LocalHub
    from tests.test_fetch import hub_repo_dir, pinned_to, place

    run = resolve_run_config("merv-full")
    place(tmp_path / "root", run)  # every weight in place but the LLM, which the hub serves
    llm = next(part for part in weight_parts(run) if part.name == "llm")
    shutil.rmtree(tmp_path / "root" / llm.path)
    hub = tmp_path / "hub"
    (hub / hub_repo_dir(llm)).mkdir(parents=True)
    (hub / hub_repo_dir(llm) / "config.json").write_text("{}")
    (hub / hub_repo_dir(llm) / "model.safetensors").write_bytes(os.urandom(1 << 20))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with LocalHub(hub) as url:
        env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf-home"))
        config = json.dumps(pinned_to(run, LocalHub(hub)).to_dict())
        shown = merv("fetch-weights", config, "--root", tmp_path / "root", env=env)
        assert shown.returncode == 0, shown.stderr[-2000:]
        shutil.rmtree(tmp_path / "root" / llm.path)
        quiet = merv("fetch-weights", config, "--root", tmp_path / "root", "-q", env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Fetching 2 files: 100%|" in shown.stderr and "llm: " in shown.stderr
    assert "%|" not in quiet.stderr and "llm: " not in quiet.stderr
    assert (tmp_path / "root" / llm.path / "model.safetensors").stat().st_size == 1 << 20
