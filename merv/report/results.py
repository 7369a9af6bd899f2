"""Reading evaluation results into one small table of numbers: model -> benchmark -> question type -> score.

``results/<model>/eval.json`` gives each benchmark's headline metric. Per question type, a benchmark entry's
``by_type`` is used when the evaluation wrote one; otherwise the per-question rows of
``results/<model>/eval/<benchmark>.json`` (``question_id`` + ``correct``) are joined with the benchmark's
``test_q.json`` (``question_type``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merv.report.config import ReportConfig

OVERALL = "all"


@dataclass(frozen=True)
class Score:
    value: float | None
    n: int


@dataclass(frozen=True)
class BenchmarkResult:
    metric: str
    chance: float | None
    scores: dict[str, Score]  # OVERALL, then one per question type


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def question_types(bench_dir: str | Path) -> dict[str, str]:
    """``question_id -> question_type`` of a MERV ``eval_data`` benchmark (empty when it has no types)."""
    questions = read_json(Path(bench_dir) / "test_q.json", "benchmark questions")
    return {str(q["question_id"]): q["question_type"] for q in questions if q.get("question_type") is not None}


def _type_value(entry: dict, metric: str) -> float | None:
    if "value" in entry:
        return entry["value"]
    return (entry.get("metrics") or {}).get(metric)


def benchmark_result(entry: dict, rows_file: Path | None, types: dict[str, str]) -> BenchmarkResult:
    """One benchmark of an ``eval.json`` with its per-type scores (from ``by_type`` or from the per-question rows)."""
    scores = {OVERALL: Score(entry["value"], entry["n"])}
    if entry.get("by_type"):
        for qtype, sub in sorted(entry["by_type"].items()):
            scores[qtype] = Score(_type_value(sub, entry["metric"]), sub["n"])
    elif types and rows_file is not None and rows_file.is_file():
        rows = read_json(rows_file, "per-question results").get("predictions", [])
        by_type: dict[str, list[bool]] = {}
        for row in rows:
            qtype = types.get(str(row["question_id"]))
            if qtype is not None:
                by_type.setdefault(qtype, []).append(bool(row["correct"]))
        for qtype, hits in sorted(by_type.items()):
            scores[qtype] = Score(sum(hits) / len(hits), len(hits))
    return BenchmarkResult(entry["metric"], entry.get("chance"), scores)


def model_results(eval_json: str | Path, types_by_bench: dict[str, dict[str, str]]) -> dict[str, BenchmarkResult]:
    """``benchmark -> BenchmarkResult`` of one model's ``eval.json`` (per-question files next to it, in ``eval/``)."""
    eval_json = Path(eval_json)
    data = read_json(eval_json, "model results")
    out = {}
    for bench, entry in data.get("benchmarks", {}).items():
        rows_file = eval_json.parent / "eval" / f"{bench}.json"
        out[bench] = benchmark_result(entry, rows_file, types_by_bench.get(bench, {}))
    return out


Results = dict[str, dict[str, BenchmarkResult]]  # model -> benchmark -> result


def load_results(cfg: ReportConfig) -> Results:
    types = {b.name: question_types(b.data) for b in cfg.benchmarks if b.data}
    return {m.name: model_results(m.results, types) for m in cfg.models}


def benchmark_names(cfg: ReportConfig, results: Results, models: tuple[str, ...]) -> list[str]:
    """Configured benchmarks, in config order, that at least one of ``models`` was evaluated on."""
    return [b.name for b in cfg.benchmarks if any(b.name in results[m] for m in models)]


def type_names(results: Results, models: tuple[str, ...], bench: str) -> list[str]:
    """The question types of ``bench`` across models, in first-seen order (overall excluded)."""
    seen: list[str] = []
    for m in models:
        for qtype in results[m].get(bench, BenchmarkResult("", None, {})).scores:
            if qtype != OVERALL and qtype not in seen:
                seen.append(qtype)
    return seen
