"""The paper's result tables, from the configured models' evaluation results.

- ``main.md`` / ``main.csv``: models x benchmarks (headline metric), then per question type for benchmarks whose
  questions have a ``question_type``;
- ``fusion_ablation.md`` / ``.csv``: per fusion variant its encoders, visual tokens the LLM sees, measured
  forward FLOPs for one question, and its scores;
- ``by_type.csv``: one row per model, benchmark and question type (``all`` = overall), what ``dvc plots`` draws;
- ``metrics.json``: the same numbers nested ``model -> benchmark -> type``, what ``dvc metrics`` compares;
- figures (:mod:`merv.report.figures`): accuracy by question type per model, and the cross-attention fusion
  weights per question type.

Numbers are percentages with one decimal in the Markdown tables, fractions in CSV and JSON.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from merv.report.config import ReportConfig
from merv.report.results import OVERALL, Results, benchmark_names, load_results, type_names

# --------------------------------------------------------------------------------------------------------------
# Formatting


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` per column: 'l' or 'r'."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _value(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------------------------------------------
# Tables


def _metric_label(results: Results, models: tuple[str, ...], bench: str) -> str:
    metrics = sorted({results[m][bench].metric for m in models if bench in results[m]})
    return f"{bench} ({'/'.join(metrics)})"


def _score(results: Results, model: str, bench: str, qtype: str = OVERALL) -> float | None:
    result = results[model].get(bench)
    score = result.scores.get(qtype) if result else None
    return score.value if score else None


def main_table(cfg: ReportConfig, results: Results) -> tuple[str, str]:
    """Markdown and CSV of the main table: models x benchmarks, then each typed benchmark by question type."""
    models = cfg.main
    benches = benchmark_names(cfg, results, models)
    header = ["model"] + [_metric_label(results, models, b) for b in benches]
    rows = [[m] + [pct(_score(results, m, b)) for b in benches] for m in models]
    md = "## Main table\n\nScores in %, one row per model, one column per benchmark.\n\n"
    md += markdown_table(header, rows)
    csv_rows = [[m] + [_value(_score(results, m, b)) for b in benches] for m in models]
    for bench in benches:
        types = type_names(results, models, bench)
        if not types:
            continue
        chance = [results[m][bench].chance for m in models if bench in results[m]]
        md += f"\n### {bench} by question type\n\n"
        if chance and chance[0] is not None:
            md += f"Chance: {pct(chance[0])}.\n\n"
        header_t = ["model", "overall"] + [t.replace("_", " ") for t in types]
        rows_t = [[m] + [pct(_score(results, m, bench, t)) for t in [OVERALL, *types]] for m in models]
        md += markdown_table(header_t, rows_t)
    return md, csv_text(["model", *benches], csv_rows)


def by_type_rows(cfg: ReportConfig, results: Results) -> list[list]:
    """``[model, benchmark, question_type, value, n]`` for every model of the report (overall as ``all``)."""
    rows = []
    for m in cfg.models:
        for bench, result in results[m.name].items():
            for qtype, score in result.scores.items():
                rows.append([m.name, bench, qtype, _value(score.value), score.n])
    return rows


def metrics_json(cfg: ReportConfig, results: Results, costs: dict[str, dict] | None = None) -> dict:
    """``model -> benchmark -> {type: value}`` (+ the model's cost when measured): DVC's metrics file."""
    out: dict = {}
    for m in cfg.models:
        entry: dict = {
            bench: {qtype: score.value for qtype, score in result.scores.items()}
            for bench, result in results[m.name].items()
        }
        if costs and m.name in costs:
            entry["cost"] = {k: costs[m.name][k] for k in ("visual_tokens", "gflops")}
        out[m.name] = entry
    return out


def ablation_table(cfg: ReportConfig, results: Results, costs: dict[str, dict]) -> tuple[str, str]:
    """Markdown and CSV of the fusion ablation: fusion, encoders, visual tokens, GFLOPs per question, scores."""
    models = cfg.fusion_ablation
    benches = benchmark_names(cfg, results, models)
    header = ["model", "fusion", "encoders", "visual tokens", "GFLOPs / question"]
    header += [_metric_label(results, models, b) for b in benches]
    rows, csv_rows = [], []
    for m in models:
        c = costs[m]
        rows.append(
            [m, c["fusion"], "+".join(c["encoders"]), str(c["visual_tokens"]), f"{c['gflops']:.3f}"]
            + [pct(_score(results, m, b)) for b in benches]
        )
        csv_rows.append(
            [m, c["fusion"], "+".join(c["encoders"]), c["visual_tokens"], f"{c['gflops']:.4f}"]
            + [_value(_score(results, m, b)) for b in benches]
        )
    md = (
        "## Fusion ablation\n\nThe same encoders, projectors and recipe, fused differently. GFLOPs: measured "
        "forward FLOPs of one multiple-choice question (encoders, projectors, fusion and the LLM's prefill).\n\n"
    )
    md += markdown_table(header, rows, ["l", "l", "l", "r", "r"] + ["r"] * len(benches))
    csv_header = ["model", "fusion", "encoders", "visual_tokens", "gflops", *benches]
    return md, csv_text(csv_header, csv_rows)


def report_files(fusion_ablation: bool, fusion_weights: bool) -> list[str]:
    """The names of the files :func:`write_report` writes, in its order: the one list the Snakemake rule's outputs
    (:func:`merv.pipeline.report_outputs`) and the generated dvc.yaml take them from."""
    names = ["main.md", "main.csv"]
    names += ["fusion_ablation.md", "fusion_ablation.csv"] if fusion_ablation else []
    names += ["by_type.csv", "metrics.json", "accuracy_by_type.png"]
    return names + (["fusion_weights.csv", "fusion_weights.png"] if fusion_weights else [])


def write_report(cfg: ReportConfig, out: Path) -> list[Path]:
    """Write every table and figure of the report under ``out`` (:func:`report_files`); returns the written paths."""
    from merv.report.figures import accuracy_by_type_png, fusion_weights_png
    from merv.report.models import fusion_weights_by_type, model_costs

    out.mkdir(parents=True, exist_ok=True)
    results = load_results(cfg)
    contents: list[str | bytes] = [*main_table(cfg, results)]
    costs = model_costs(cfg) if cfg.fusion_ablation else {}
    if cfg.fusion_ablation:
        contents += ablation_table(cfg, results, costs)
    contents.append(csv_text(["model", "benchmark", "question_type", "value", "n"], by_type_rows(cfg, results)))
    contents.append(json.dumps(metrics_json(cfg, results, costs), indent=1, sort_keys=True) + "\n")
    contents.append(accuracy_by_type_png(cfg, results))
    if cfg.fusion_weights_model:
        weights = fusion_weights_by_type(cfg)
        contents.append(csv_text(["question_type", "encoder", "mean", "std", "n"], [list(r) for r in weights]))
        contents.append(fusion_weights_png(cfg, weights))
    written = []
    names = report_files(bool(cfg.fusion_ablation), cfg.fusion_weights_model is not None)
    for name, content in zip(names, contents, strict=True):
        path = out / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        written.append(path)
    return written
