"""Integration: the real Snakemake pipeline on a few synthetic clips, in a temp working directory."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow


SEEDS = 2  # the reported models train under two seeds: results/<model>/seed-{0,1}/


def small_config() -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["synth"].update(train_videos=8, eval_videos=4)
    cfg["shards"]["target_size"] = "200KB"
    cfg["models"]["merv_tiny"]["overrides"] = {"train": {"stages": {"finetune": {"epochs": 2}}}}
    cfg["eval"]["batch_size"] = 4
    for spec in cfg["pretrain"].values():  # a few pretext steps: the pipeline's shape, not the encoders' quality
        spec.update(steps=3, batch_size=4, eval_samples=4)
    # two models of the grid and the tables over them (the whole grid: benchmarks/thesis_fresh_clone.py)
    cfg["pipeline"]["models"] = ["merv_tiny", "tiny_motion"]
    cfg["report"] = {"main": ["merv_tiny", "tiny_motion"], "fusion_ablation": ["merv_tiny"],
                     "fusion_weights": {"model": "merv_tiny", "benchmark": "synth_mcq"},
                     "seeds": list(range(SEEDS))}  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    cfg = small_config()
    write_config(workdir, cfg)
    res = snakemake(workdir, "results/merv_tiny/eval.json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return workdir, cfg


def test_eval_json_has_the_promised_shape(pipeline):
    workdir, _ = pipeline
    over_seeds = json.loads((workdir / "results" / "merv_tiny" / "eval.json").read_text())
    assert over_seeds["model"] == "merv_tiny" and over_seeds["seeds"] == [0, 1]
    by_seed = [json.loads((workdir / f"results/merv_tiny/seed-{s}/eval.json").read_text()) for s in (0, 1)]
    for name, b in over_seeds["benchmarks"].items():
        values = [r["benchmarks"][name]["value"] for r in by_seed]
        assert b["by_seed"] == {"0": values[0], "1": values[1]} and b["value"] == pytest.approx(sum(values) / 2)
    result = by_seed[0]
    assert result["seed"] == 0 and re.fullmatch(r"[0-9a-f]{16}", result["config_fingerprint"])
    mcq, open_ended = result["benchmarks"]["synth_mcq"], result["benchmarks"]["synth_open"]
    assert mcq["metric"] == "accuracy_generate_firstchar" and mcq["n"] == 4 and 0 <= mcq["value"] <= 1
    assert 0 <= mcq["metrics"]["accuracy_likelihood"] <= 1 and set(mcq["degenerate"]) >= {"empty", "no_option_letter"}
    assert 0.25 <= mcq["chance"] <= 1 / 3
    assert open_ended["metric"] == "exact_match" and open_ended["n"] == 4 and "chance" not in open_ended
    seeds = set()
    for seed in (0, 1):
        for stage in ("align", "finetune"):
            meta = json.loads((workdir / f"results/merv_tiny/seed-{seed}/train/{stage}/meta.json").read_text())
            assert meta["stage"] == stage and meta["step"] >= 1
            seeds.add((stage, meta["seed"]))
        assert (workdir / f"results/merv_tiny/seed-{seed}/logs/train_finetune.log").is_file()
    assert seeds == {(stage, s) for stage in ("align", "finetune") for s in (7, 8)}, "seed s moves the preset's 7"


def test_rerun_has_nothing_to_do(pipeline):
    workdir, _ = pipeline
    res = snakemake(workdir, "-n", "results/merv_tiny/eval.json")
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr


def planned(dry_run_output: str) -> list[tuple[str, str, str]]:
    """``(rule, output, reason)`` of every job a dry run plans."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", dry_run_output):
        rule = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        if rule:
            output = re.search(r"^    output: (.*)$", block, re.M)
            reason = re.search(r"^    reason: (.*)$", block, re.M)
            jobs.append((rule[1], output[1] if output else "", reason[1] if reason else ""))
    return jobs


def _answer_edit(path: Path) -> None:
    answers = json.loads(path.read_text())
    answers[0]["answer"] = "an edited answer"
    path.write_text(json.dumps(answers))


def _question_edit(path: Path) -> None:
    questions = json.loads(path.read_text())
    questions[0]["question"] = "An edited question?"
    path.write_text(json.dumps(questions))


def _label_edit(path: Path) -> None:
    samples = json.loads(path.read_text())
    samples[0]["conversations"][1]["value"] = "An edited label."
    path.write_text(json.dumps(samples))


def _replace_video(path: Path) -> None:
    """Another clip of the same dataset written over this one, in place."""
    others = sorted(p for p in path.parent.glob("*.mp4") if p != path and p.stat().st_size != path.stat().st_size)
    path.write_bytes(others[0].read_bytes())


def _rewrite_result(path: Path) -> None:
    result = json.loads(path.read_text())
    result["run"] = {**result["run"], "edited": True}
    path.write_text(json.dumps(result))


def _rerun(path: Path) -> None:
    """What a rerun of the rule that made a folder does to Snakemake's view of it: a new timestamp."""
    (path / ".snakemake_timestamp").touch()


EVAL = {"eval_benchmark": 2 * SEEDS, "merge_eval": 2 * SEEDS, "collect_eval": SEEDS, "collect_seeds": 1}
ONE_BENCH = {"eval_benchmark": SEEDS, "merge_eval": SEEDS, "collect_eval": SEEDS, "collect_seeds": 1}


def feature_jobs(caches: int) -> dict[str, int]:
    """The jobs that remake ``caches`` feature caches of a one-part split: the part's extraction, the gather."""
    return {"extract_feature_part": caches, "gather_features": caches}


# (what is edited, how, the input file its direct consumers name, the jobs the plan must hold)
EDITS = [
    ("data/synth/eval_data/synth_mcq/test_a.json", _answer_edit, None,
     {"shard_benchmark": 1, **ONE_BENCH}),
    ("data/synth/eval_data/synth_mcq/test_q.json", _question_edit, None,
     {"index_benchmark_media": 1, "shard_benchmark": 1, **ONE_BENCH}),
    ("data/synth/eval_data/synth_open/videos/eval_00001.mp4", _replace_video, "data/media/eval/synth_open.json",
     {"shard_benchmark": 1, **ONE_BENCH}),
    # (the parts a replanned split reruns are known once the plan ran: tests/test_parts_pipeline.py)
    ("data/synth/train/align.json", _label_edit, None,
     {"plan_train_parts": 1, "gather_train_shards": 1, "gather_features": 2, "train_stage": 2 * SEEDS, **EVAL}),
    # (the part's media index is brought up to date when planning: its content, a param of the part's job, changed)
    ("data/synth/train/videos/train_00001.mp4", _replace_video, "Params have changed",
     {"shard_train_part": 2, "gather_train_shards": 2, **feature_jobs(4), "train_stage": 2 * SEEDS, **EVAL}),
    ("data/weights/pretrained/motion", _rerun, None, {**feature_jobs(2), "train_stage": 2 * SEEDS, **EVAL}),
    ("data/weights/merv_tiny/built", _rerun, None, {"train_stage": 2 * SEEDS, **EVAL}),
    # one seed's files: only that seed's jobs, then the model's eval.json over seeds
    ("results/merv_tiny/seed-0/train/align", _rerun, None,
     {"train_stage": 1, "eval_benchmark": 2, "merge_eval": 2, "collect_eval": 1, "collect_seeds": 1}),
    ("results/merv_tiny/seed-1/eval/synth_open/chunk-0-of-1.json", _rewrite_result, None,
     {"merge_eval": 1, "collect_eval": 1, "collect_seeds": 1}),
    ("results/merv_tiny/seed-0/eval/synth_mcq.json", _rewrite_result, None, {"collect_eval": 1, "collect_seeds": 1}),
]  # fmt: skip


def _snapshot(workdir: Path, edited: Path) -> dict[Path, tuple[bytes, int]]:
    """Bytes and mtime of what an edit (and the plan after it) may change: the file, the media indexes."""
    paths = [edited / ".snakemake_timestamp" if edited.is_dir() else edited]
    paths += sorted((workdir / "data" / "media").rglob("*.json"))
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def test_each_input_of_each_rule_reruns_exactly_its_dependents(pipeline):
    """For every input of every rule of merv_tiny's DAG (a source file edited, a video replaced in place, or an
    intermediate output rebuilt), `snakemake -n` plans exactly the jobs that depend on it, and the first of them names
    that input. Before, an edited test_a.json planned nothing: shard_benchmark listed only test_q.json."""
    workdir, _ = pipeline
    for rel, edit, named, expected in EDITS:
        path = workdir / rel
        saved = _snapshot(workdir, path)
        try:
            edit(path)
            res = snakemake(workdir, "-n", "results/merv_tiny/eval.json")
            out = res.stdout + res.stderr
            assert res.returncode == 0, out[-3000:]
            assert planned_jobs(out) == expected, (rel, planned_jobs(out))
            first = [r for _, _, r in planned(out) if r.startswith(("Updated input files", "Params have changed"))]
            assert first and all((named or rel) in r for r in first), (rel, first)
        finally:
            for p, (data, mtime) in saved.items():
                p.write_bytes(data)
                os.utime(p, ns=(mtime, mtime))
    res = snakemake(workdir, "-n", "results/merv_tiny/eval.json")
    assert "Nothing to be done" in res.stdout + res.stderr, "everything was put back"


def test_changing_an_eval_setting_reruns_only_evaluation(pipeline):
    workdir, cfg = pipeline
    changed = json.loads(json.dumps(cfg))
    changed["eval"]["max_new_tokens"] = 5
    write_config(workdir, changed)
    try:
        res = snakemake(workdir, "-n", "results/merv_tiny/eval.json")
        assert res.returncode == 0, res.stderr
        assert planned_jobs(res.stdout + res.stderr) == EVAL
        # and a training change reruns that stage and what follows, not the data stages
        changed["models"]["merv_tiny"]["overrides"]["train"]["stages"]["finetune"]["lr"] = 1e-3
        write_config(workdir, changed)
        res = snakemake(workdir, "-n", "results/merv_tiny/eval.json")
        assert planned_jobs(res.stdout + res.stderr) == {"train_stage": SEEDS, **EVAL}
    finally:
        write_config(workdir, cfg)


def test_changing_one_encoders_frame_count_re_extracts_only_that_encoder(pipeline):
    """merv_tiny trains from cached features: after vit's frame count changes (4 -> 8, both in the shard set), the
    plan re-extracts vit's features of both splits and retrains, while vivit's caches are kept (their frames did not
    change; training checks that by content when it opens them)."""
    workdir, cfg = pipeline
    changed = json.loads(json.dumps(cfg))
    changed["models"]["merv_tiny"]["overrides"]["model"] = {"encoders": {"vit": {"num_frames": 8}}}
    write_config(workdir, changed)
    try:
        res = snakemake(workdir, "-n", "results/merv_tiny/eval.json")
        assert res.returncode == 0, res.stderr[-3000:]
        out = res.stdout + res.stderr
        assert planned_jobs(out) == {
            "build_tiny_weights": 1,  # its config names the frame counts
            **feature_jobs(2),  # once for every seed
            "train_stage": 2 * SEEDS,
            **EVAL,
        }
        caches = re.findall(r"output: data/features/merv_tiny/([^/\s]+)\n", out)  # the gathered caches
        assert sorted(c.split("-")[:2] for c in caches) == [["align", "vit"], ["finetune", "vit"]], caches
    finally:
        write_config(workdir, cfg)


def test_changing_how_training_is_launched_reruns_nothing(pipeline):
    workdir, cfg = pipeline
    changed = json.loads(json.dumps(cfg))
    changed["launch"] = {"launcher": "slurm", "nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}
    write_config(workdir, changed)
    try:
        res = snakemake(workdir, "-n", "results/merv_tiny/eval.json")
        assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr
    finally:
        write_config(workdir, cfg)


def test_bad_video_stops_the_pipeline_naming_the_file(pipeline):
    workdir, cfg = pipeline
    user = workdir / "user_data"
    (user / "videos").mkdir(parents=True)
    (user / "videos" / "broken.mp4").write_bytes(b"not an mp4" * 100)
    sample = {
        "id": "u1",
        "video": "videos/broken.mp4",
        "conversations": [{"from": "human", "value": "<video>\nHi"}, {"from": "gpt", "value": "Hello"}],
    }
    (user / "train.json").write_text(json.dumps([sample]))
    bad = json.loads(json.dumps(cfg))
    bad["data"]["train"]["mine"] = {"json": "user_data/train.json"}
    write_config(workdir, bad)
    try:
        res = snakemake(workdir, "data/shards/small/train/mine")
        assert res.returncode != 0
        log = (workdir / "results" / "logs" / "shard_train_part_small_mine_part-00000.log").read_text()
        assert "cannot read video user_data/videos/broken.mp4: not a decodable video" in log
        assert "Traceback" not in log
        shards = workdir / "data" / "shards" / "small"
        assert not (shards / "train" / "mine").exists()
        assert (shards / "train" / "finetune" / "manifest.json").is_file(), "other data kept"
    finally:
        write_config(workdir, cfg)


def test_config_error_stops_before_any_job(pipeline):
    workdir, cfg = pipeline
    bad = json.loads(json.dumps(cfg))
    bad["models"]["merv_tiny"]["overrides"] = {"model": {"projector": {"tokens_per_frame": 3}}}
    write_config(workdir, bad)
    try:
        res = snakemake(workdir, "-n")
        assert res.returncode != 0 and "tokens_per_frame must be a perfect square" in res.stdout + res.stderr
        bad["models"]["merv_tiny"]["overrides"] = {"model": {"projector": {"temporal_tokens": 16}}}
        write_config(workdir, bad)
        res = snakemake(workdir, "-n")
        assert res.returncode != 0 and "256 visual tokens leave 0 of llm.max_length 256" in res.stdout + res.stderr
    finally:
        write_config(workdir, cfg)


def test_default_target_is_the_selected_models_and_any_configured_model_is_a_target(pipeline):
    workdir, _ = pipeline
    res = snakemake(workdir, "-n")  # merv_tiny is done: the other selected model, then the tables
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = planned_jobs(res.stdout + res.stderr)
    assert jobs == {"build_tiny_weights": 1, **feature_jobs(2), "train_stage": 2 * SEEDS, **EVAL,
                    "make_tables": 1, "all": 1}, jobs  # fmt: skip
    assert (
        "output: results/tiny_motion/seed-1/train/finetune" in res.stdout
        and "output: results/merv_tiny/seed" not in res.stdout
    )
    # merv_full is configured (real weights, fetched): a target, planned on its own 224 px shard set
    res = snakemake(workdir, "-n", "results/merv_full/eval.json")
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = planned_jobs(res.stdout + res.stderr)
    assert jobs == {"fetch_weights": 1, "shard_train_part": 2, "gather_train_shards": 2, "shard_benchmark": 2,
                    "train_stage": 2,  # not reported: its own seed only
                    "eval_benchmark": 2, "merge_eval": 2, "collect_eval": 1, "collect_seeds": 1}, jobs  # fmt: skip
    assert "data/shards/paper/train/align" in res.stdout


def test_the_default_target_ends_in_the_tables(pipeline):
    """`snakemake` trains the other selected model, then writes the tables and figures over both."""
    workdir, _ = pipeline
    res = snakemake(workdir)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tables = workdir / "results" / "tables"
    main = (tables / "main.md").read_text()
    assert "| merv_tiny |" in main and "| tiny_motion |" in main and "synth_mcq by question type" in main
    metrics = json.loads((tables / "metrics.json").read_text())
    assert set(metrics) >= {"merv_tiny", "tiny_motion"}
    assert (tables / "fusion_weights.png").stat().st_size > 0 and (tables / "accuracy_by_type.png").is_file()
    for name in ("appearance", "motion"):
        pretext = json.loads((workdir / "data" / "weights" / "pretrained" / name / "pretext.json").read_text())
        assert pretext["config"]["steps"] == 3


def test_report_builds_with_loss_curves(pipeline):
    workdir, _ = pipeline
    res = snakemake(workdir, "--report", "report.html")
    assert res.returncode == 0, res.stderr[-3000:]
    html = (workdir / "report.html").read_text()
    assert "train_stage" in html and "loss.png" in html and "eval.json" in html


def test_status_lists_what_is_trained_and_evaluated(pipeline):
    workdir, _ = pipeline
    res = subprocess.run([sys.executable, "-m", "merv.cli", "status", "--json"], cwd=workdir, capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = {r["model"]: r for r in json.loads(res.stdout)}
    tiny, full = rows["merv_tiny"], rows["merv_full"]
    assert tiny["selected"] and tiny["weights_ready"] and tiny["stages"] == {"align": SEEDS, "finetune": SEEDS}
    assert set(tiny["eval"]) == {"synth_mcq", "synth_open"} and tiny["seeds"] == [0, 1]
    assert not full["selected"] and full["stages"] == {"align": 0, "finetune": 0} and not full["eval"]
