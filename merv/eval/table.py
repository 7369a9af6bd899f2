"""``merv table``: one table across models' ``eval.json`` -- Markdown, CSV and a bar chart PNG.

Columns are (benchmark, metric): a judged and an exact-match number never share a column. Judged numbers of one
benchmark must come from one judge (model, prompt version, sampling settings); mixing judges is refused, naming
them, because judge drift moves scores by points (see README).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Metrics shown per benchmark kind, in order (when present); "chance" goes to the CSV only.
SHOWN = ("accuracy_generate_firstchar", "accuracy_likelihood", "judge_accuracy", "judge_score", "exact_match")
PERCENT = {"accuracy_generate_firstchar", "accuracy_likelihood", "judge_accuracy", "exact_match"}


def load_results(paths: list[str | Path]) -> list[dict]:
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read eval.json ({e})") from None
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
    header = "| model | " + " | ".join(f"{b}<br>{m}" for b, m in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for res in results:
        cells = [_fmt(m, value.get((res["model"], b, m))) for b, m in columns]
        lines.append(f"| {res['model']} | " + " | ".join(cells) + " |")
    notes = ["", "Accuracies in %, judge_score on 0-5. accuracy_generate_firstchar: MERV's scoring (first character"
             " of the generated answer); accuracy_likelihood: the most likely option letter."]  # fmt: skip
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        judged = [r for r in rows if r["benchmark"] == bench and r["judge_model"]]
        if judged:
            notes.append(f"{bench}: judge {judged[0]['judge_model']}, prompt {judged[0]['judge_prompt_version']}.")
        limited = sorted({r["model"] for r in rows if r["benchmark"] == bench and r["limit"]})
        if limited:
            notes.append(f"{bench}: only the first questions (--limit) for {', '.join(limited)}.")
    return "\n".join(lines + notes) + "\n"


def bar_chart(results: list[dict], rows: list[dict], path: Path) -> None:
    """Grouped bars: the headline metric of every benchmark, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = {(r["model"], b): (r["benchmarks"][b]["metric"], r["benchmarks"][b]["value"])
                for r in results for b in r["benchmarks"]}  # fmt: skip
    benches = list(dict.fromkeys(b for _, b in headline))
    models = [r["model"] for r in results]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(benches) + 2), 3.5))
    for i, model in enumerate(models):
        xs, ys = [], []
        for j, bench in enumerate(benches):
            metric, value = headline.get((model, bench), (None, None))
            if value is not None and metric in PERCENT:
                xs.append(j + (i - (len(models) - 1) / 2) * width)
                ys.append(100 * value)
        ax.bar(xs, ys, width, label=model)
    ax.set_xticks(range(len(benches)))
    ax.set_xticklabels([f"{b}\n{headline.get((models[0], b), ('', None))[0] or ''}" for b in benches], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(paths: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` (long format) and ``table.png`` into ``out``; returns their paths."""
    results = load_results(paths)
    rows = long_rows(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "table.md", "csv": out / "table.csv", "png": out / "table.png"}
    files["markdown"].write_text(markdown(results, rows))
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
    bar_chart(results, rows, files["png"])
    return files
