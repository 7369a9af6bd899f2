"""The report's tables from small fixture results: exact Markdown, CSV and metrics, both ways of getting types."""

import json
from pathlib import Path

import pytest

from merv.report.config import report_config_from_dict
from merv.report.results import load_results
from merv.report.tables import ablation_table, main_table, metrics_json

QUESTIONS = [
    {"question_id": "q1", "video_name": "v1", "question": "?", "question_type": "colour"},
    {"question_id": "q2", "video_name": "v2", "question": "?", "question_type": "colour"},
    {"question_id": "q3", "video_name": "v3", "question": "?", "question_type": "first_direction"},
    {"question_id": "q4", "video_name": "v4", "question": "?", "question_type": "first_direction"},
]


def write(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def eval_json(model: str, mcq: float, open_: float, by_type: dict | None = None) -> dict:
    mcq_entry = {"metric": "accuracy", "value": mcq, "n": 4, "chance": 0.25}
    if by_type is not None:
        mcq_entry["by_type"] = by_type
    return {
        "model": model,
        "benchmarks": {"mcq": mcq_entry, "open": {"metric": "exact_match", "value": open_, "n": 4}},
    }


@pytest.fixture
def spec(tmp_path) -> dict:
    """Model `fused` reports by_type in eval.json (the evaluation's own); `single` has only per-question rows."""
    bench = tmp_path / "eval_data" / "mcq"
    write(bench / "test_q.json", QUESTIONS)
    by_type = {
        "colour": {"n": 2, "chance": 0.25, "metrics": {"accuracy": 1.0}},
        "first_direction": {"n": 2, "chance": 0.25, "metrics": {"accuracy": 0.5}},
    }
    fused = write(tmp_path / "results" / "fused" / "eval.json", eval_json("fused", 0.75, 0.5, by_type))
    single = write(tmp_path / "results" / "single" / "eval.json", eval_json("single", 0.5, 0.25))
    rows = [{"question_id": q, "correct": c} for q, c in (("q1", True), ("q2", True), ("q3", False), ("q4", False))]
    write(tmp_path / "results" / "single" / "eval" / "mcq.json", {"predictions": rows})
    return {
        "models": [{"name": "fused", "results": fused}, {"name": "single", "results": single}],
        "benchmarks": [{"name": "mcq", "data": str(bench)}, {"name": "open"}],
        "main": ["fused", "single"],
    }


def test_main_table_markdown_and_csv(spec):
    cfg = report_config_from_dict(spec)
    md, csv = main_table(cfg, load_results(cfg))
    assert md == (
        "## Main table\n\nScores in %, one row per model, one column per benchmark.\n\n"
        "| model | mcq (accuracy) | open (exact_match) |\n"
        "| --- | ---: | ---: |\n"
        "| fused | 75.0 | 50.0 |\n"
        "| single | 50.0 | 25.0 |\n"
        "\n### mcq by question type\n\nChance: 25.0.\n\n"
        "| model | overall | colour | first direction |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| fused | 75.0 | 100.0 | 50.0 |\n"
        "| single | 50.0 | 100.0 | 0.0 |\n"
    )
    assert csv == "model,mcq,open\nfused,0.7500,0.5000\nsingle,0.5000,0.2500\n"


def test_metrics_nest_model_benchmark_type(spec):
    cfg = report_config_from_dict(spec)
    metrics = metrics_json(cfg, load_results(cfg))
    assert metrics["single"] == {"mcq": {"all": 0.5, "colour": 1.0, "first_direction": 0.0}, "open": {"all": 0.25}}
    assert metrics["fused"]["mcq"]["first_direction"] == 0.5


def test_ablation_table_shows_cost_and_scores(spec):
    spec["fusion_ablation"] = ["fused", "single"]
    for m in spec["models"]:
        m["checkpoint"] = "unused"
    cfg = report_config_from_dict(spec)
    costs = {
        "fused": {"fusion": "cross_attention", "encoders": ["a", "b"], "visual_tokens": 64, "gflops": 0.01234},
        "single": {"fusion": "single", "encoders": ["a"], "visual_tokens": 64, "gflops": 0.005},
    }
    md, csv = ablation_table(cfg, load_results(cfg), costs)
    assert md.endswith(
        "| model | fusion | encoders | visual tokens | GFLOPs / question | mcq (accuracy) | open (exact_match) |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: |\n"
        "| fused | cross_attention | a+b | 64 | 0.012 | 75.0 | 50.0 |\n"
        "| single | single | a | 64 | 0.005 | 50.0 | 25.0 |\n"
    )
    assert csv.splitlines()[1] == "fused,cross_attention,a+b,64,0.0123,0.7500,0.5000"


def test_unknown_model_in_a_table_is_named(spec):
    spec["main"] = ["fused", "nope"]
    with pytest.raises(ValueError, match=r"report.main: unknown model\(s\) \['nope'\]"):
        report_config_from_dict(spec)


def test_missing_results_file_is_named(spec, tmp_path):
    spec["models"][1]["results"] = str(tmp_path / "missing.json")
    cfg = report_config_from_dict(spec)
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        load_results(cfg)


def test_write_report_writes_exactly_the_named_files(spec, tmp_path):
    """The files on disk are report_files' names (the Snakemake rule's and dvc.yaml's outputs), no more."""
    from merv.report.tables import report_files, write_report

    written = write_report(report_config_from_dict(spec), tmp_path / "tables")
    names = report_files(fusion_ablation=False, fusion_weights=False)
    assert [p.name for p in written] == names
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == sorted(names)
    assert "| fused | 75.0 |" in (tmp_path / "tables" / "main.md").read_text()
    json.loads((tmp_path / "tables" / "metrics.json").read_text())
