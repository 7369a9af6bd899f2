"""``merv report EVAL.json ...`` (also ``merv table``): one table across models' ``eval.json`` files -- every metric
of every benchmark, in Markdown, CSV (long format) and a bar chart PNG -- without a report spec.

Columns are (benchmark, metric): a judged and an exact-match number never share a column. Judged numbers of one
benchmark must come from one judge (model, prompt version, sampling settings); mixing judges is refused, naming
them, because judge drift moves scores by points (see README).
"""

from __future__ import annotations

from pathlib import Path

from merv.report.figures import grouped_bars_png
from merv.report.results import read_json
from merv.report.tables import csv_text, markdown_table

# Metrics shown per benchmark kind, in order (when present); "chance" goes to the CSV only.
SHOWN = ("accuracy_generate_firstchar", "accuracy_likelihood", "judge_accuracy", "judge_score", "exact_match")
PERCENT = {"accuracy_generate_firstchar", "accuracy_likelihood", "judge_accuracy", "exact_match"}


def load_evals(paths: list[str | Path]) -> list[dict]:
    """The ``eval.json`` files, checked to be merv's, one per model name."""
    results = []
    for path in paths:
        data = read_json(path, "eval.json")
        if not isinstance(data, dict) or "benchmarks" not in data or "model" not in data:
            raise ValueError(f"{path}: not a merv eval.json (needs 'model' and 'benchmarks')")
        results.append({**data, "_path": str(path)})
    names = [r["model"] for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"two eval.json files for one model name: {names}")
    return results


def _judge_id(bench: dict) -> tuple | None:
    judge = (bench.get("manifest") or {}).get("judge")
    if not judge:
        return None
    return (judge.get("model"), judge.get("prompt_version"), judge.get("temperature"), judge.get("max_tokens"))


def long_rows(results: list[dict]) -> list[dict]:
    """One row per (model, benchmark, metric), refusing mixed judges within a benchmark."""
    judges: dict[str, dict[tuple, list[str]]] = {}
    rows = []
    for res in results:
        for bench, b in res["benchmarks"].items():
            judge = _judge_id(b)
            if judge is not None:
                judges.setdefault(bench, {}).setdefault(judge, []).append(res["model"])
            for metric, value in (b.get("metrics") or {}).items():
                rows.append(
                    {
                        "model": res["model"],
                        "benchmark": bench,
                        "metric": metric,
                        "value": value,
                        "n": b.get("n"),
                        "unjudged": b.get("unjudged"),
                        "limit": (b.get("questions") or {}).get("limit"),
                        "judge_model": judge[0] if judge else None,
                        "judge_prompt_version": judge[1] if judge else None,
                        "config_fingerprint": b.get("config_fingerprint"),
                    }
                )
    for bench, by_judge in judges.items():
        if len(by_judge) > 1:
            listed = "; ".join(f"{models} judged by {j[0]} (prompt {j[1]}, T={j[2]}, max_tokens={j[3]})"
                               for j, models in by_judge.items())  # fmt: skip
            raise ValueError(f"benchmark {bench!r} was judged by different judges, not comparable: {listed}")
    return rows


def _fmt(metric: str, value) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if metric in PERCENT else f"{value:.2f}"


def markdown(results: list[dict], rows: list[dict]) -> str:
    columns = []  # (benchmark, metric) in first-seen benchmark order, metrics in SHOWN order
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        present = {r["metric"] for r in rows if r["benchmark"] == bench}
        columns += [(bench, m) for m in SHOWN if m in present]
    value = {(r["model"], r["benchmark"], r["metric"]): r["value"] for r in rows}
    header = ["model"] + [f"{b}<br>{m}" for b, m in columns]
    cells = [[res["model"]] + [_fmt(m, value.get((res["model"], b, m))) for b, m in columns] for res in results]
    notes = ["", "Accuracies in %, judge_score on 0-5. accuracy_generate_firstchar: MERV's scoring (first character"
             " of the generated answer); accuracy_likelihood: the most likely option letter."]  # fmt: skip
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        judged = [r for r in rows if r["benchmark"] == bench and r["judge_model"]]
        if judged:
            notes.append(f"{bench}: judge {judged[0]['judge_model']}, prompt {judged[0]['judge_prompt_version']}.")
        limited = sorted({r["model"] for r in rows if r["benchmark"] == bench and r["limit"]})
        if limited:
            notes.append(f"{bench}: only the first questions (--limit) for {', '.join(limited)}.")
    return markdown_table(header, cells) + "\n".join(notes) + "\n"


def headline_percent(results: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """The bar chart's data: benchmarks (with their headline metric) and per model its headline value in % (NaN
    where missing or not a percentage)."""
    headline = {(r["model"], b): (r["benchmarks"][b]["metric"], r["benchmarks"][b]["value"])
                for r in results for b in r["benchmarks"]}  # fmt: skip
    benches = list(dict.fromkeys(b for _, b in headline))
    models = [r["model"] for r in results]
    series = {}
    for model in models:
        values = []
        for bench in benches:
            metric, value = headline.get((model, bench), (None, None))
            values.append(100 * value if value is not None and metric in PERCENT else float("nan"))
        series[model] = values
    labels = [f"{b} {headline.get((models[0], b), ('', None))[0] or ''}" for b in benches]
    return labels, series


def write_comparison(paths: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` (long format) and ``table.png`` into ``out``; returns their paths."""
    results = load_evals(paths)
    rows = long_rows(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "table.md", "csv": out / "table.csv", "png": out / "table.png"}
    files["markdown"].write_text(markdown(results, rows))
    fields = list(rows[0]) if rows else ["model"]
    files["csv"].write_text(csv_text(fields, [[r[f] for f in fields] for r in rows]))
    files["png"].write_bytes(grouped_bars_png(*headline_percent(results), ylabel="%"))
    return files
