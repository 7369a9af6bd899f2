"""The report's tables over seeds from results merged and collected as the pipeline does (tests/report/fake_results):
means with their CIs, per question type, exact where the bootstrap is (all seeds alike or no variation at all), the
files written, byte-identical on a rerun, and bad specs or results named."""

import json
from pathlib import Path

import numpy as np
import pytest

from merv.report.config import read_report_spec, report_config_from_dict
from merv.report.results import estimates, load_results
from merv.report.stats import bootstrap_ci
from merv.report.tables import ablation_table, main_table, metrics_json, report_files, write_report
from tests.report.fake_results import TYPES, model_spec, qtype, question_ids

IDS = question_ids(8)  # two questions per type
MOTION = ("first_direction", "last_direction")


def answers(rule) -> dict[str, bool]:
    return {q: bool(rule(q)) for q in IDS}


@pytest.fixture
def spec(tmp_path) -> dict:
    """Three models, seeds 0 and 1, two benchmarks of 8 questions:
    - fused: seed 0 right on everything, seed 1 wrong on everything (all variation is between seeds);
    - appearance: right on colour and shape, both seeds, on both benchmarks (no variation at all per type);
    - motion: right on the direction questions and on q0000 (a colour question), both seeds."""
    everything, nothing = answers(lambda q: True), answers(lambda q: False)
    appearance = answers(lambda q: qtype(q) not in MOTION)
    motion = answers(lambda q: qtype(q) in MOTION or q == "q0000")
    models = [
        model_spec(tmp_path, "fused", "merv-tiny", {s: {"synth_mcq": c, "synth_open": c} for s, c in
                                                     ((0, everything), (1, nothing))}),
        model_spec(tmp_path, "appearance", "merv-tiny-appearance",
                   {s: {"synth_mcq": appearance, "synth_open": appearance} for s in (0, 1)}),
        model_spec(tmp_path, "motion", "merv-tiny-motion",
                   {s: {"synth_mcq": motion, "synth_open": motion} for s in (0, 1)}),
    ]  # fmt: skip
    return {
        "models": models,
        "benchmarks": [{"name": "synth_mcq"}, {"name": "synth_open"}],
        "main": ["fused", "appearance", "motion"],
    }


def test_main_table_markdown_and_csv(spec):
    cfg = report_config_from_dict(spec)
    results = load_results(cfg)
    md, csv = main_table(cfg, results, estimates(results))
    motion = bootstrap_ci(np.array([[q == "q0000" or qtype(q) in MOTION for q in IDS]] * 2, dtype=float))
    assert motion.mean == 5 / 8 and 0 < motion.low < motion.mean < motion.high <= 1
    m = f"{100 * motion.mean:.1f} [{100 * motion.low:.1f}, {100 * motion.high:.1f}]"
    a = f"50.0 [{_appearance_ci()}]"
    assert md.startswith(
        "## Main table\n\nMean over 2 seeds (0, 1) and each benchmark's questions, in %, with its 95% confidence "
        "interval [low, high]: a percentile bootstrap over seeds and questions (10000 replicates).\n\n"
        "| model | synth_mcq (accuracy_generate_firstchar) | synth_open (exact_match) |\n"
        "| --- | ---: | ---: |\n"
        "| fused | 50.0 [0.0, 100.0] | 50.0 [0.0, 100.0] |\n"
        f"| appearance | {a} | {a} |\n"
        f"| motion | {m} | {m} |\n"
        "\n### synth_mcq by question type\n\nQuestions: 8 (colour 2, first direction 2, last direction 2, shape 2). "
        "Chance: 25.0.\n\n"
        "| model | overall | colour | first direction | last direction | shape |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |\n"
        f"| fused |{' 50.0 [0.0, 100.0] |' * 5}\n"
        f"| appearance | {a} | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] | 100.0 [100.0, 100.0] |\n"
    )
    assert "### synth_open by question type\n\nQuestions: 8 (colour 2, first direction 2, last direction 2, " \
        "shape 2).\n\n" in md  # fmt: skip
    lines = csv.splitlines()
    assert lines[0] == (
        "model,benchmark,metric,mean,ci_low,ci_high,n_seeds,n_questions,seeds,chance,"
        "colour,first_direction,last_direction,shape"
    )
    assert lines[1] == "fused,synth_mcq,accuracy_generate_firstchar,0.5000,0.0000,1.0000,2,8,0 1,0.2500," + ",".join(
        ["0.5000"] * 4
    )
    assert lines[2] == "fused,synth_open,exact_match,0.5000,0.0000,1.0000,2,8,0 1,,0.5000,0.5000,0.5000,0.5000"
    assert lines[5] == (
        f"motion,synth_mcq,accuracy_generate_firstchar,0.6250,{motion.low:.4f},{motion.high:.4f},2,8,0 1,0.2500,"
        "0.5000,1.0000,1.0000,0.0000"
    )
    assert len(lines) == 1 + 3 * 2


def _appearance_ci() -> str:
    e = bootstrap_ci(np.array([[qtype(q) not in MOTION for q in IDS]] * 2, dtype=float))
    return f"{100 * e.low:.1f}, {100 * e.high:.1f}"


def test_metrics_and_by_type_carry_the_cis(spec, tmp_path):
    cfg = report_config_from_dict(spec)
    results = load_results(cfg)
    metrics = metrics_json(cfg, results, estimates(results))
    fused = metrics["fused"]["synth_mcq"]
    assert {t: fused[t] for t in ("all", *TYPES)} == dict.fromkeys(("all", *TYPES), 0.5)
    assert fused["ci_low"]["all"] == 0.0 and fused["ci_high"]["shape"] == 1.0
    assert (fused["n_seeds"], fused["n_questions"]) == (2, 8)
    assert metrics["appearance"]["synth_open"]["colour"] == 1.0 and metrics["motion"]["synth_open"]["shape"] == 0.0

    write_report(cfg, tmp_path / "tables")
    by_type = (tmp_path / "tables" / "by_type.csv").read_text().splitlines()
    assert by_type[0] == "model,benchmark,question_type,value,ci_low,ci_high,n_seeds,n"
    assert "appearance,synth_mcq,first_direction,0.0000,0.0000,0.0000,2,2" in by_type
    assert "fused,synth_open,all,0.5000,0.0000,1.0000,2,8" in by_type


def test_ablation_table_shows_cost_and_scores_with_cis(spec):
    spec["fusion_ablation"] = ["fused", "appearance"]
    cfg = report_config_from_dict(spec)
    results = load_results(cfg)
    costs = {
        "fused": {"fusion": "cross_attention", "encoders": ["a", "b"], "visual_tokens": 64, "gflops": 0.01234},
        "appearance": {"fusion": "single", "encoders": ["a"], "visual_tokens": 64, "gflops": 0.005},
    }
    md, csv = ablation_table(cfg, results, estimates(results), costs)
    assert md.endswith(
        "| model | fusion | encoders | visual tokens | GFLOPs / question | synth_mcq (accuracy_generate_firstchar) "
        "| synth_open (exact_match) |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: |\n"
        "| fused | cross_attention | a+b | 64 | 0.012 | 50.0 [0.0, 100.0] | 50.0 [0.0, 100.0] |\n"
        f"| appearance | single | a | 64 | 0.005 | 50.0 [{_appearance_ci()}] | 50.0 [{_appearance_ci()}] |\n"
    )
    lines = csv.splitlines()
    assert lines[0] == (
        "model,fusion,encoders,visual_tokens,gflops,n_seeds,synth_mcq,synth_mcq_ci_low,synth_mcq_ci_high,"
        "synth_open,synth_open_ci_low,synth_open_ci_high"
    )
    assert lines[1] == "fused,cross_attention,a+b,64,0.0123,2,0.5000,0.0000,1.0000,0.5000,0.0000,1.0000"


def test_write_report_writes_the_named_files_and_the_same_bytes_twice(spec, tmp_path):
    """The files on disk are report_files' names (the Snakemake rule's and dvc.yaml's outputs), no more; a second
    report of the same results, by `merv report` in another process with another hash seed, is byte-identical (the
    bootstrap's seed is fixed, nothing depends on set order)."""
    import os
    import subprocess
    import sys

    cfg = report_config_from_dict(spec)
    first = write_report(cfg, tmp_path / "a")
    names = report_files(fusion_ablation=False, fusion_weights=False)
    assert [p.name for p in first] == names and "paired.csv" in names and "paired.md" in names
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(names)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONHASHSEED="12345")
    res = subprocess.run([sys.executable, "-m", "merv", "report", "--spec", str(tmp_path / "spec.json"), "--out",
                          str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    for a in first:
        assert a.read_bytes() == (tmp_path / "b" / a.name).read_bytes(), a.name
    assert "| fused | 50.0 [0.0, 100.0] |" in (tmp_path / "a" / "main.md").read_text()
    json.loads((tmp_path / "a" / "metrics.json").read_text())


def test_report_command_takes_the_spec_inline_or_as_a_file(spec, tmp_path, capsys):
    from merv.cli import main

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(["report", "--spec", str(path), "--out", str(tmp_path / "file")]) == 0
    assert "| fused | 50.0 [0.0, 100.0] |" in capsys.readouterr().out
    assert main(["report", "--spec", json.dumps(spec), "--out", str(tmp_path / "inline")]) == 0
    assert (tmp_path / "file" / "main.csv").read_bytes() == (tmp_path / "inline" / "main.csv").read_bytes()
    assert main(["report", "--spec", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")]) != 0
    assert "nope.json is neither inline JSON nor a file" in capsys.readouterr().err
    assert read_report_spec(str(path)).model("motion").seeds == (0, 1)


def test_bad_runs_are_named(spec):
    bad = json.loads(json.dumps(spec))
    bad["models"][1]["runs"] = []
    with pytest.raises(ValueError, match=r"report.models\[1\]: model 'appearance' has no runs"):
        report_config_from_dict(bad)
    bad["models"][1]["runs"] = [spec["models"][1]["runs"][0]] * 2
    with pytest.raises(ValueError, match=r"model 'appearance' lists seed\(s\) \[0\] more than once"):
        report_config_from_dict(bad)
    bad = json.loads(json.dumps(spec))
    bad["models"][2]["runs"][0]["checkpoint"] = None
    with pytest.raises(ValueError, match=r"report.main: model 'motion' needs its first run's checkpoint"):
        report_config_from_dict(bad)
    bad["main"] = ["fused", "nope"]
    with pytest.raises(ValueError, match=r"report.main: unknown model\(s\) \['nope'\]"):
        report_config_from_dict(bad)


def test_a_question_one_seed_lacks_is_named(spec, tmp_path):
    """Seed 1 of `motion` was evaluated on a benchmark without q0005 (a merged result of its own, consistent in
    itself): the report refuses to pool it, naming the model, benchmark, seeds and question."""
    from tests.report.fake_results import write_run

    spec["models"][2]["runs"][1]["results"] = write_run(
        tmp_path / "other",
        "motion",
        1,
        {b: {q: True for q in IDS if q != "q0005"} for b in ("synth_mcq", "synth_open")},
    )
    with pytest.raises(
        ValueError,
        match=r"model 'motion', benchmark 'synth_mcq': seed 1 scored other questions than seed 0 "
        r"\(missing \['q0005'\], extra \[\]\)",
    ):
        load_results(report_config_from_dict(spec))


def test_rows_that_disagree_with_eval_json_or_are_missing_are_refused(spec):
    eval_json = spec["models"][0]["runs"][0]["results"]
    rows_file = eval_json.replace("eval.json", "eval/synth_mcq.json")
    merged = json.loads(Path(rows_file).read_text())
    merged["rows"][0]["correct_generate"] = False  # a rows file that is not the one eval.json summarises
    Path(rows_file).write_text(json.dumps(merged))
    with pytest.raises(ValueError, match=r"synth_mcq.json .*its rows give accuracy_generate_firstchar 0.875000 over 8 "
                       r"questions, eval.json says 1.0"):  # fmt: skip
        load_results(report_config_from_dict(spec))
    Path(rows_file).unlink()
    with pytest.raises(FileNotFoundError, match=r"per-question results: .*seed-0/eval/synth_mcq.json not found"):
        load_results(report_config_from_dict(spec))
