"""Seeds as a dimension of the report: CIs that shrink with more seeds and more questions, paired comparisons that
find a real difference and none where there is none, which models are compared, and error bars in the figure."""

import csv

import numpy as np
import pytest

from merv.report.config import report_config_from_dict
from merv.report.results import compare, estimates, load_results
from merv.report.tables import comparison_pairs, write_report
from tests.report.fake_results import model_spec, question_ids

PRESET = {"fused": "merv-tiny", "fused2": "merv-tiny-channel-concat", "app": "merv-tiny-appearance",
          "mot": "merv-tiny-motion"}  # fmt: skip


def spec_of(root, answers: dict[str, dict[int, dict[str, bool]]], **tables) -> dict:
    """``answers[model][seed][question_id]`` on one benchmark, ``mcq``."""
    models = [
        model_spec(root, name, PRESET[name], {seed: {"mcq": correct} for seed, correct in by_seed.items()})
        for name, by_seed in answers.items()
    ]
    return {"models": models, "benchmarks": [{"name": "mcq"}], "main": list(answers)} | tables


def width(root, by_seed: dict[int, dict[str, bool]]) -> float:
    results = load_results(report_config_from_dict(spec_of(root, {"fused": by_seed})))
    e = estimates(results)["fused"]["mcq"]["all"]
    return e.high - e.low


def answers(n: int, seeds, accuracy) -> dict[int, dict[str, bool]]:
    """Seed s right on question i when (i + 3 s) mod 10 < 10 accuracy(s): that accuracy, other questions wrong."""
    ids = question_ids(n)
    return {s: {q: (i + 3 * s) % 10 < round(10 * accuracy(s)) for i, q in enumerate(ids)} for s in seeds}


def test_the_ci_shrinks_with_more_questions_and_more_seeds(tmp_path):
    few = width(tmp_path / "40", answers(40, [0, 1], lambda s: 0.8))
    many = width(tmp_path / "400", answers(400, [0, 1], lambda s: 0.8))
    assert many < 0.5 * few  # ~ 1/sqrt(10)
    # seeds that differ (accuracy 0.6 or 0.9 alternately): more of them pin the mean down
    two, six = (width(tmp_path / f"s{k}", answers(200, range(k), lambda s: 0.6 if s % 2 else 0.9)) for k in (2, 6))
    assert six < 0.75 * two


def _rows(path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_a_model_right_on_more_questions_wins_the_paired_test(tmp_path):
    """Over 3 seeds of 100 questions, B is right on 60 questions per seed and A on those and 15 more: A wins (both
    p-values < 0.05, the CI above 0); A against an identical copy: difference 0, p = 1."""
    ids = question_ids(100)
    b = {s: {q: (i + 7 * s) % 100 < 60 for i, q in enumerate(ids)} for s in range(3)}
    a = {s: {q: b[s][q] or (i + 7 * s) % 100 >= 85 for i, q in enumerate(ids)} for s in range(3)}
    spec = spec_of(tmp_path / "r", {"fused": a, "fused2": b, "app": b}, fusion_ablation=["fused", "fused2"])
    cfg = report_config_from_dict(spec)
    results = load_results(cfg)
    win = compare(results, "fused", "app", "mcq")
    assert win.diff == pytest.approx(0.15) and (win.a_only, win.b_only) == (45, 0)
    assert win.low > 0 and win.p_bootstrap < 0.05 and win.p_mcnemar < 0.05
    same = compare(results, "fused2", "app", "mcq")
    assert (same.diff, same.low, same.high, same.p_bootstrap, same.p_mcnemar, same.a_only) == (0, 0, 0, 1, 1, 0)

    from merv.report.tables import paired_comparisons, paired_table

    _, text = paired_table(cfg, results, paired_comparisons(cfg, results))
    (tmp_path / "paired.csv").write_text(text)
    rows = {(r["table"], r["model_a"], r["model_b"], r["question_type"]): r for r in _rows(tmp_path / "paired.csv")}
    row = rows["main", "fused", "app", "all"]
    assert (row["diff"], row["a_only"], row["b_only"], row["n_seeds"], row["n_questions"]) == ("0.1500", "45", "0",
                                                                                               "3", "100")  # fmt: skip
    assert float(row["p_value"]) < 0.05 and float(row["ci_low"]) > 0
    assert rows["fusion_ablation", "fused", "fused2", "all"]["diff"] == "0.1500"
    assert ("main", "fused2", "app", "all") in rows  # channel concat also has two encoders: fused
    assert {k[3] for k in rows} == {"all", "colour", "first_direction", "last_direction", "shape"}


def test_which_models_are_compared(tmp_path):
    """Fused (more than one encoder, from the checkpoint's config) against each single-encoder model of the main
    table; every two models of the fusion ablation in its order."""
    ids = question_ids(8)
    one = {0: dict.fromkeys(ids, True)}
    spec = spec_of(tmp_path, {n: one for n in PRESET}, fusion_ablation=["fused2", "fused", "app"])
    assert comparison_pairs(report_config_from_dict(spec)) == [
        ("main", "fused", "app"), ("main", "fused", "mot"), ("main", "fused2", "app"), ("main", "fused2", "mot"),
        ("fusion_ablation", "fused2", "fused"), ("fusion_ablation", "fused2", "app"),
        ("fusion_ablation", "fused", "app"),
    ]  # fmt: skip


def test_a_paired_comparison_needs_the_same_seeds(tmp_path):
    ids = question_ids(8)
    spec = spec_of(tmp_path, {"fused": {0: dict.fromkeys(ids, True), 1: dict.fromkeys(ids, True)},
                              "app": {0: dict.fromkeys(ids, False), 2: dict.fromkeys(ids, False)}})  # fmt: skip
    cfg = report_config_from_dict(spec)
    with pytest.raises(ValueError, match=r"'fused' vs 'app' on 'mcq': the models were trained with other seeds "
                       r"\(\[0, 1\] vs \[0, 2\]\)"):  # fmt: skip
        write_report(cfg, tmp_path / "tables")


def test_seeds_are_paired_by_their_number_not_their_order(tmp_path):
    """Model B lists its seeds in another order: seed s of A is compared with seed s of B."""
    ids = question_ids(20)
    a = {0: dict.fromkeys(ids, True), 1: dict.fromkeys(ids, False)}
    spec = spec_of(tmp_path, {"fused": a, "app": {1: a[1], 0: a[0]}})
    c = compare(load_results(report_config_from_dict(spec)), "fused", "app", "mcq")
    assert (c.diff, c.a_only, c.b_only) == (0, 0, 0)


def test_the_accuracy_figure_has_ci_error_bars(tmp_path):
    from merv.report.figures import accuracy_by_type_figure

    ids = question_ids(40)
    by_seed = {s: {q: (i + s) % 4 != 0 for i, q in enumerate(ids)} for s in range(3)}
    spec = spec_of(tmp_path, {"fused": by_seed, "app": {s: dict.fromkeys(ids, True) for s in range(3)}})
    cfg = report_config_from_dict(spec)
    results = load_results(cfg)
    est = estimates(results)
    fig = accuracy_by_type_figure(cfg, results, est)
    bars = [c for c in fig.axes[0].containers if hasattr(c, "errorbar")]
    assert len(bars) == 2  # one series per model
    fused_all = bars[0].errorbar.lines[2][0].get_segments()[0]  # the overall group's error bar of model fused
    e = est["fused"]["mcq"]["all"]
    assert fused_all[:, 1] == pytest.approx([100 * e.low, 100 * e.high])
    assert e.low < e.mean < e.high
    app = bars[1].errorbar.lines[2][0].get_segments()[0]
    assert app[:, 1] == pytest.approx([100, 100])  # no variation: a bar of zero length
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert np.isfinite(fused_all).all()


def test_a_rows_score_is_the_headline_metric_of_the_summary():
    """Per metric, the mean of the report's per-question scores is merv.eval.metrics.summarise's number for the same
    rows (likelihood and generation both scored; open-ended rows judged, one left unjudged)."""
    from merv.eval.metrics import summarise
    from merv.report.results import ROW_SCORE

    mcq = [
        {"question_id": f"q{i}", "num_options": 4, "prediction": "A" if i % 3 else "C", "letter": "A" if i % 3 else "C",
         "correct_generate": bool(i % 3), "likelihood": {"choice": "A" if i % 2 else "B", "correct": bool(i % 2)}}
        for i in range(10)
    ]  # fmt: skip
    opened = [
        {"question_id": f"o{i}", "prediction": "x", "exact_match": i < 4}
        | ({"unjudged": "no reply"} if i == 9 else {"verdict": {"pred": "yes" if i % 4 else "no", "score": 3}})
        for i in range(10)
    ]
    for rows, kind, metrics in ((mcq, "mcq", ("accuracy_generate_firstchar", "accuracy_likelihood")),
                                (opened, "open", ("exact_match", "judge_accuracy"))):  # fmt: skip
        summary = summarise(rows, kind)
        for metric in metrics:
            scores = [s for s in map(ROW_SCORE[metric], rows) if s is not None]
            assert sum(scores) / len(scores) == pytest.approx(summary["metrics"][metric]), metric
    assert sum(ROW_SCORE["judge_accuracy"](r) is None for r in opened) == 1
