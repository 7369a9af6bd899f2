"""The report's figures as PNG bytes (matplotlib, no display)."""

from __future__ import annotations

import io

import numpy as np

from merv.report.config import ReportConfig
from merv.report.results import OVERALL, Estimates, Results, benchmark_names, type_names


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], errors: dict | None = None):
    """One bar per series in each group; ``errors[series]``: error bars, ``[N]`` (symmetric) or ``[2, N]`` (below,
    above)."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        yerr = errors[label] if errors else None
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=yerr, capsize=2, label=label)
    ax.set_xticks(x, [g.replace("_", "\n") for g in groups])


def grouped_bars_png(groups: list[str], series: dict[str, list[float]], ylabel: str) -> bytes:
    """Grouped bars (0-100): per group one bar per series (NaN: none)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(groups) + 2), 3.5))
    _grouped_bars(ax, groups, series)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    return _png(fig)


def accuracy_by_type_png(cfg: ReportConfig, results: Results, est: Estimates) -> bytes:
    """:func:`accuracy_by_type_figure` as PNG."""
    return _png(accuracy_by_type_figure(cfg, results, est))


def accuracy_by_type_figure(cfg: ReportConfig, results: Results, est: Estimates):
    """Per benchmark with question types (else overall only): grouped bars of each model's mean score per type, with
    its 95% CI (over seeds and questions) as error bars."""
    plt = _pyplot()
    models = tuple(dict.fromkeys([*cfg.main, *cfg.fusion_ablation]))
    benches = benchmark_names(cfg, results, models)
    fig, axes = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 4), dpi=100, squeeze=False)
    for ax, bench in zip(axes[0], benches, strict=True):
        groups = [OVERALL, *type_names(results, models, bench)]
        series, errors = {}, {}
        for m in models:
            cells = [est[m].get(bench, {}).get(g) for g in groups]
            series[m] = [100 * e.mean if e else np.nan for e in cells]
            errors[m] = np.array([[100 * (e.mean - e.low), 100 * (e.high - e.mean)] if e else [0, 0] for e in cells]).T
        _grouped_bars(ax, groups, series, errors)
        chance = next((results[m][bench].chance for m in models if bench in results[m]), None)
        if chance is not None:
            ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_ylim(0, 105)
        ax.set_ylabel("score (%, 95% CI)")
        ax.set_title(bench)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return fig


def fusion_weights_png(cfg: ReportConfig, rows: list[tuple]) -> bytes:
    """Mean (± std over videos) fusion weight of each encoder, per question type of the benchmark."""
    plt = _pyplot()
    groups = list(dict.fromkeys(r[0] for r in rows))
    encoders = list(dict.fromkeys(r[1] for r in rows))
    table = {(r[0], r[1]): r for r in rows}
    series = {e: [table[(g, e)][2] for g in groups] for e in encoders}
    errors = {e: [table[(g, e)][3] for g in groups] for e in encoders}
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    _grouped_bars(ax, groups, series, errors)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fusion weight")
    ax.set_title(f"{cfg.fusion_weights_model}: cross-attention weights on {cfg.fusion_weights_benchmark}")
    ax.legend(title="encoder", fontsize=8)
    return _png(fig)
