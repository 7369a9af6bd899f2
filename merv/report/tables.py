"""The paper's result tables, from the configured models' per-question results over their seeds.

Every number is a mean over a model's seeds and a benchmark's questions with its 95% confidence interval: a
percentile bootstrap resampling seeds and questions, crossed (:mod:`merv.report.stats`), with one fixed bootstrap
seed, so the same results give the same bytes.

- ``main.md`` / ``main.csv``: one row per model and benchmark: headline metric, mean, CI, seeds, questions, then
  the mean per question type;
- ``fusion_ablation.md`` / ``.csv``: per fusion variant its encoders, visual tokens the LLM sees, measured forward
  FLOPs for one question (first run's checkpoint), and its scores with CIs;
- ``paired.md`` / ``paired.csv``: paired comparisons, per benchmark and question type (``all`` = overall): each
  *fused* model of the main table (more than one encoder, from its checkpoint's config) against each
  *single-encoder* one, and every two variants of the fusion ablation (in its order): mean difference A - B per
  question, pooled over seeds, with its CI, the paired-bootstrap p-value and the exact McNemar test;
- ``by_type.csv``: one row per model, benchmark and question type, with its CI: what ``dvc plots`` draws;
- ``metrics.json``: ``model -> benchmark -> {type: mean, ci_low: {type: ...}, ci_high: {...}, n_seeds,
  n_questions}`` (+ ``cost``), what ``dvc metrics`` compares;
- figures (:mod:`merv.report.figures`): accuracy by question type per model with CI error bars, and the
  cross-attention fusion weights per question type.

Numbers are percentages with one decimal in the Markdown tables, fractions in CSV and JSON.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from merv.report.config import ReportConfig
from merv.report.results import (
    OVERALL,
    RESAMPLES,
    Estimates,
    Results,
    benchmark_names,
    compare,
    estimates,
    load_results,
    model_encoders,
    type_names,
)
from merv.report.stats import LEVEL, Comparison, Estimate

# --------------------------------------------------------------------------------------------------------------
# Formatting


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def pct_ci(e: Estimate | None) -> str:
    """``mean [low, high]`` in %."""
    return "–" if e is None else f"{pct(e.mean)} [{pct(e.low)}, {pct(e.high)}]"


def points_ci(c: Comparison) -> str:
    """A difference in percentage points with its CI, signed."""
    return f"{100 * c.diff:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"


def p_value(p: float | None) -> str:
    return "" if p is None else f"{p:.4g}"


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


def _seeds(results: Results, models: tuple[str, ...]) -> str:
    """The seeds of ``models``, as a phrase ('3 seeds (0, 1, 2)'; per model when they differ)."""
    by_model = {m: next(iter(results[m].values())).seeds for m in models if results[m]}
    distinct = set(by_model.values())
    if len(distinct) == 1:
        (seeds,) = distinct
        return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"
    return "seeds " + "; ".join(f"{m}: {', '.join(map(str, s))}" for m, s in by_model.items())


def _method(results: Results, models: tuple[str, ...]) -> str:
    return (
        f"Mean over {_seeds(results, models)} and each benchmark's questions, in %, with its {LEVEL:.0%} confidence "
        f"interval [low, high]: a percentile bootstrap over seeds and questions ({RESAMPLES} replicates)."
    )


# --------------------------------------------------------------------------------------------------------------
# Tables


def _metric_label(results: Results, models: tuple[str, ...], bench: str) -> str:
    metrics = sorted({results[m][bench].metric for m in models if bench in results[m]})
    return f"{bench} ({'/'.join(metrics)})"


def _est(est: Estimates, model: str, bench: str, qtype: str = OVERALL) -> Estimate | None:
    return est[model].get(bench, {}).get(qtype)


def _type_counts(results: Results, models: tuple[str, ...], bench: str, types: list[str]) -> str:
    scores = next(results[m][bench] for m in models if bench in results[m])
    counts = [f"{t.replace('_', ' ')} {scores.question_types.count(t)}" for t in types]
    return f"Questions: {len(scores.question_ids)} ({', '.join(counts)})."


def main_table(cfg: ReportConfig, results: Results, est: Estimates) -> tuple[str, str]:
    """Markdown and CSV of the main table: models x benchmarks (mean [CI]), then each typed benchmark by type."""
    models = cfg.main
    benches = benchmark_names(cfg, results, models)
    header = ["model"] + [_metric_label(results, models, b) for b in benches]
    rows = [[m] + [pct_ci(_est(est, m, b)) for b in benches] for m in models]
    md = f"## Main table\n\n{_method(results, models)}\n\n" + markdown_table(header, rows)
    for bench in benches:
        types = type_names(results, models, bench)
        if not types:
            continue
        chance = [results[m][bench].chance for m in models if bench in results[m]]
        md += f"\n### {bench} by question type\n\n{_type_counts(results, models, bench, types)}"
        md += f" Chance: {pct(chance[0])}.\n\n" if chance and chance[0] is not None else "\n\n"
        header_t = ["model", "overall"] + [t.replace("_", " ") for t in types]
        rows_t = [[m] + [pct_ci(_est(est, m, bench, t)) for t in [OVERALL, *types]] for m in models]
        md += markdown_table(header_t, rows_t)

    all_types = sorted({t for b in benches for t in type_names(results, models, b)})
    csv_header = ["model", "benchmark", "metric", "mean", "ci_low", "ci_high", "n_seeds", "n_questions", "seeds"]
    csv_header += ["chance", *all_types]
    csv_rows = []
    for m in models:
        for bench in benches:
            if bench not in results[m]:
                continue
            scores, e = results[m][bench], est[m][bench]
            overall = e[OVERALL]
            csv_rows.append(
                [m, bench, scores.metric, _value(overall.mean), _value(overall.low), _value(overall.high)]
                + [overall.seeds, overall.questions, " ".join(map(str, scores.seeds)), _value(scores.chance)]
                + [_value(e[t].mean) if t in e else "" for t in all_types]
            )
    return md, csv_text(csv_header, csv_rows)


def by_type_rows(cfg: ReportConfig, results: Results, est: Estimates) -> list[list]:
    """``[model, benchmark, question_type, value, ci_low, ci_high, n_seeds, n]`` for every model of the report
    (overall as ``all``; ``n``: questions)."""
    rows = []
    for m in cfg.models:
        for bench in results[m.name]:
            for qtype, e in est[m.name][bench].items():
                rows.append([m.name, bench, qtype, _value(e.mean), _value(e.low), _value(e.high), e.seeds, e.questions])
    return rows


BY_TYPE_HEADER = ["model", "benchmark", "question_type", "value", "ci_low", "ci_high", "n_seeds", "n"]


def metrics_json(cfg: ReportConfig, results: Results, est: Estimates, costs: dict[str, dict] | None = None) -> dict:
    """``model -> benchmark -> {type: mean, ci_low: {type: ...}, ci_high: {type: ...}, n_seeds, n_questions}``
    (+ the model's cost when measured): DVC's metrics file."""
    out: dict = {}
    for m in cfg.models:
        entry: dict = {}
        for bench in results[m.name]:
            e = est[m.name][bench]
            entry[bench] = {qtype: round(x.mean, 6) for qtype, x in e.items()}
            entry[bench] |= {
                "ci_low": {qtype: round(x.low, 6) for qtype, x in e.items()},
                "ci_high": {qtype: round(x.high, 6) for qtype, x in e.items()},
                "n_seeds": e[OVERALL].seeds,
                "n_questions": e[OVERALL].questions,
            }
        if costs and m.name in costs:
            entry["cost"] = {k: costs[m.name][k] for k in ("visual_tokens", "gflops")}
        out[m.name] = entry
    return out


def ablation_table(cfg: ReportConfig, results: Results, est: Estimates, costs: dict[str, dict]) -> tuple[str, str]:
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
            + [pct_ci(_est(est, m, b)) for b in benches]
        )
        scores = [_est(est, m, b) for b in benches]
        csv_rows.append(
            [m, c["fusion"], "+".join(c["encoders"]), c["visual_tokens"], f"{c['gflops']:.4f}"]
            + [len(cfg.model(m).runs)]
            + [_value(getattr(e, k) if e else None) for e in scores for k in ("mean", "low", "high")]
        )
    md = (
        "## Fusion ablation\n\nThe same encoders, projectors and recipe, fused differently. GFLOPs: measured "
        "forward FLOPs of one multiple-choice question (encoders, projectors, fusion and the LLM's prefill). "
        f"{_method(results, models)}\n\n"
    )
    md += markdown_table(header, rows, ["l", "l", "l", "r", "r"] + ["r"] * len(benches))
    csv_header = ["model", "fusion", "encoders", "visual_tokens", "gflops", "n_seeds"]
    csv_header += [f"{b}{suffix}" for b in benches for suffix in ("", "_ci_low", "_ci_high")]
    return md, csv_text(csv_header, csv_rows)


# --------------------------------------------------------------------------------------------------------------
# Paired comparisons


def comparison_pairs(cfg: ReportConfig) -> list[tuple[str, str, str]]:
    """``(table, model A, model B)``: each fused model of the main table (more than one encoder) against each of its
    single-encoder models, then every two models of the fusion ablation in its order."""
    encoders = {m: model_encoders(cfg, m) for m in cfg.main}
    fused = [m for m in cfg.main if len(encoders[m]) > 1]
    single = [m for m in cfg.main if len(encoders[m]) == 1]
    pairs = [("main", a, b) for a in fused for b in single]
    ablation = cfg.fusion_ablation
    return pairs + [("fusion_ablation", a, b) for i, a in enumerate(ablation) for b in ablation[i + 1 :]]


PAIRED_HEADER = [
    "table", "benchmark", "question_type", "model_a", "model_b", "metric", "mean_a", "mean_b", "diff", "ci_low",
    "ci_high", "p_value", "a_only", "b_only", "p_mcnemar", "n_seeds", "n_questions",
]  # fmt: skip


def paired_comparisons(cfg: ReportConfig, results: Results) -> list[tuple[str, str, str, str, str, Comparison]]:
    """``(table, benchmark, question type, A, B, comparison)`` for every pair of :func:`comparison_pairs`, on every
    benchmark both were evaluated on, overall then per question type."""
    out = []
    for table, a, b in comparison_pairs(cfg):
        for bench in benchmark_names(cfg, results, (a, b)):
            if bench not in results[a] or bench not in results[b]:
                continue
            for qtype in [OVERALL, *type_names(results, (a, b), bench)]:
                out.append((table, bench, qtype, a, b, compare(results, a, b, bench, qtype)))
    return out


def paired_table(cfg: ReportConfig, results: Results, comparisons: list) -> tuple[str, str]:
    """Markdown and CSV of the paired comparisons."""
    csv_rows = [
        [table, bench, qtype, a, b, results[a][bench].metric, _value(c.mean_a), _value(c.mean_b), _value(c.diff),
         _value(c.low), _value(c.high), p_value(c.p_bootstrap), "" if c.a_only is None else c.a_only,
         "" if c.b_only is None else c.b_only, p_value(c.p_mcnemar), c.seeds, c.questions]
        for table, bench, qtype, a, b, c in comparisons
    ]  # fmt: skip
    md = (
        "## Paired comparisons\n\nModel A - model B on the same questions, paired per question and seed, pooled over "
        f"seeds: the mean difference in percentage points with its {LEVEL:.0%} CI and two-sided p-value from a paired "
        f"bootstrap over seeds and questions ({RESAMPLES} replicates); A only / B only: (seed, question) pairs only "
        "A / only B got right, and the exact McNemar p-value on them. Fused: a main-table model with more than one "
        "encoder, against each single-encoder one. p-values are not corrected for multiple comparisons.\n"
    )
    titles = {"main": "Fused vs single-encoder (main table)", "fusion_ablation": "Fusion ablation: every two variants"}
    for table, title in titles.items():
        mine = [x for x in comparisons if x[0] == table]
        if not mine:
            continue
        md += f"\n### {title}\n\n"
        header = ["benchmark", "A", "B", "A (%)", "B (%)", "A - B (points) [CI]", "p", "A only / B only", "McNemar p"]
        rows = [
            [bench, a, b, pct(c.mean_a), pct(c.mean_b), points_ci(c), p_value(c.p_bootstrap),
             "" if c.a_only is None else f"{c.a_only} / {c.b_only}", p_value(c.p_mcnemar)]
            for _, bench, qtype, a, b, c in mine
            if qtype == OVERALL
        ]  # fmt: skip
        md += markdown_table(header, rows, ["l", "l", "l"] + ["r"] * 6)
        for bench in dict.fromkeys(x[1] for x in mine):
            typed = [x for x in mine if x[1] == bench and x[2] != OVERALL]
            if not typed:
                continue
            types = list(dict.fromkeys(x[2] for x in typed))
            md += f"\n{bench} by question type: A - B [CI] (p)\n\n"
            cells = {(x[3], x[4], x[2]): x[5] for x in typed}
            pairs = list(dict.fromkeys((x[3], x[4]) for x in typed))
            header_t = ["A", "B"] + [t.replace("_", " ") for t in types]
            rows_t = [
                [a, b] + [f"{points_ci(cells[a, b, t])} ({p_value(cells[a, b, t].p_bootstrap)})" for t in types]
                for a, b in pairs
            ]
            md += markdown_table(header_t, rows_t, ["l", "l"] + ["r"] * len(types))
    if not comparisons:
        md += "\nNo comparison: the main table has no fused and single-encoder pair, and no fusion ablation.\n"
    return md, csv_text(PAIRED_HEADER, csv_rows)


# --------------------------------------------------------------------------------------------------------------
# The report


def report_files(fusion_ablation: bool, fusion_weights: bool) -> list[str]:
    """The names of the files :func:`write_report` writes, in its order: the one list the Snakemake rule's outputs
    (:func:`merv.pipeline.report_outputs`) and the generated dvc.yaml take them from."""
    names = ["main.md", "main.csv"]
    names += ["fusion_ablation.md", "fusion_ablation.csv"] if fusion_ablation else []
    names += ["paired.md", "paired.csv", "by_type.csv", "metrics.json", "accuracy_by_type.png"]
    return names + (["fusion_weights.csv", "fusion_weights.png"] if fusion_weights else [])


def write_report(cfg: ReportConfig, out: Path) -> list[Path]:
    """Write every table and figure of the report under ``out`` (:func:`report_files`); returns the written paths."""
    from merv.report.figures import accuracy_by_type_png, fusion_weights_png
    from merv.report.models import fusion_weights_by_type, model_costs

    out.mkdir(parents=True, exist_ok=True)
    results = load_results(cfg)
    est = estimates(results)
    contents: list[str | bytes] = [*main_table(cfg, results, est)]
    costs = model_costs(cfg) if cfg.fusion_ablation else {}
    if cfg.fusion_ablation:
        contents += ablation_table(cfg, results, est, costs)
    contents += paired_table(cfg, results, paired_comparisons(cfg, results))
    contents.append(csv_text(BY_TYPE_HEADER, by_type_rows(cfg, results, est)))
    contents.append(json.dumps(metrics_json(cfg, results, est, costs), indent=1, sort_keys=True) + "\n")
    contents.append(accuracy_by_type_png(cfg, results, est))
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
