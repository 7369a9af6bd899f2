"""merv report over eval.json files (merv table): Markdown, CSV and PNG across models; judged numbers of different
judges are never mixed."""

from __future__ import annotations

import copy
import csv
import json

import pytest

from merv.report.compare import write_comparison


def _eval_json(model: str, judge: str | None, mcq: float, open_value: float) -> dict:
    open_metrics = {"exact_match": 0.2}
    if judge:
        open_metrics |= {"judge_accuracy": open_value, "judge_score": 3.1}
    return {
        "model": model,
        "config_fingerprint": "f",
        "benchmarks": {
            "synth_mcq": {
                "metric": "accuracy_generate_firstchar",
                "value": mcq,
                "n": 10,
                "chance": 0.27,
                "metrics": {"accuracy_generate_firstchar": mcq, "accuracy_likelihood": mcq + 0.1},
                "questions": {"limit": None},
                "manifest": {"judge": None},
            },
            "msvd_qa": {
                "metric": "judge_accuracy" if judge else "exact_match",
                "value": open_value if judge else 0.2,
                "n": 10,
                "unjudged": 1 if judge else None,
                "metrics": open_metrics,
                "questions": {"limit": 5},
                "manifest": {"judge": {"model": judge, "prompt_version": "p1", "temperature": 0.0, "max_tokens": 64}}
                if judge
                else {"judge": None},
            },
        },
    }


def test_table_across_models(tmp_path):
    paths = []
    for model, judge, mcq, judged in (("merv_a", "qwen-72b", 0.61, 0.55), ("merv_b", "qwen-72b", 0.5, 0.4)):
        paths.append(tmp_path / f"{model}.json")
        paths[-1].write_text(json.dumps(_eval_json(model, judge, mcq, judged)))
    files = write_comparison(paths, tmp_path / "out")
    md = files["markdown"].read_text()
    assert "| merv_a | 61.00 | 71.00 | 55.00 | 3.10 | 20.00 |" in md
    assert "| merv_b | 50.00 | 60.00 | 40.00 | 3.10 | 20.00 |" in md
    assert "msvd_qa: judge qwen-72b, prompt p1." in md and "only the first questions (--limit)" in md
    rows = list(csv.DictReader(files["csv"].read_text().splitlines()))
    assert len(rows) == 2 * 5 and {r["judge_model"] for r in rows if r["benchmark"] == "msvd_qa"} == {"qwen-72b"}
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixed_judges_are_refused_naming_them(tmp_path):
    a = _eval_json("merv_a", "qwen-72b", 0.6, 0.5)
    b = copy.deepcopy(a) | {"model": "merv_b"}
    b["benchmarks"]["msvd_qa"]["manifest"]["judge"]["model"] = "gpt-4o-mini"
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (a, b), strict=True):
        path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"msvd_qa.*different judges.*qwen-72b.*gpt-4o-mini"):
        write_comparison(paths, tmp_path / "out")
    # an exact-match number sits in its own column beside a judged one: allowed
    c = _eval_json("merv_c", None, 0.4, 0.0)
    paths[1].write_text(json.dumps(c))
    md = write_comparison(paths, tmp_path / "out")["markdown"].read_text()
    assert "| merv_c | 40.00 | 50.00 | – | – | 20.00 |" in md


def test_report_command_takes_eval_files_or_a_spec(tmp_path, capsys):
    from merv.cli import main

    path = tmp_path / "a.json"
    path.write_text(json.dumps(_eval_json("merv_a", "qwen-72b", 0.61, 0.55)))
    assert main(["table", str(path), "--out", str(tmp_path / "t")]) == 0  # merv table: an alias of merv report
    assert "| merv_a | 61.00 |" in capsys.readouterr().out
    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "table.md").read_text() == (tmp_path / "t" / "table.md").read_text()
    assert main(["report", "--out", str(tmp_path / "n")]) != 0
    assert "either --spec" in capsys.readouterr().err
