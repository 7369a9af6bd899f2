"""merv.report.stats against what nobody here wrote (SciPy's bootstrap and binomial test, statsmodels' McNemar)
and against explicit formulas."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from merv.report.stats import (
    align_questions,
    bootstrap_ci,
    crossed_bootstrap,
    mcnemar_exact,
    paired_comparison,
    score_matrix,
)


@pytest.fixture(scope="module")
def two_models():
    """0/1 correctness of two models on 200 questions (A ~0.8, B ~0.7, correlated as models on shared questions)."""
    rng = np.random.default_rng(42)
    difficulty = rng.random(200)
    a = (difficulty < 0.8).astype(float)
    b = ((difficulty + rng.normal(0, 0.15, 200)) < 0.7).astype(float)
    return a, b


def test_one_seed_ci_matches_scipy_bootstrap(two_models):
    a, _ = two_models
    ours = bootstrap_ci(a, resamples=20_000, seed=1)
    ref = scipy_stats.bootstrap((a,), np.mean, n_resamples=20_000, method="percentile", rng=2).confidence_interval
    assert ours.mean == pytest.approx(a.mean())
    assert ours.low == pytest.approx(ref.low, abs=0.006) and ours.high == pytest.approx(ref.high, abs=0.006)
    # and the textbook width: +-1.96 standard errors of a proportion
    se = np.sqrt(a.mean() * (1 - a.mean()) / a.size)
    assert ours.high - ours.low == pytest.approx(2 * 1.96 * se, rel=0.08)


def test_paired_difference_ci_matches_scipy_paired_bootstrap(two_models):
    a, b = two_models
    ours = paired_comparison(a, b, resamples=20_000, seed=3)
    ref = scipy_stats.bootstrap(
        (a, b), lambda x, y, axis: (x - y).mean(axis=axis), paired=True, n_resamples=20_000, method="percentile", rng=4
    ).confidence_interval
    assert ours.diff == pytest.approx(a.mean() - b.mean())
    assert ours.low == pytest.approx(ref.low, abs=0.006) and ours.high == pytest.approx(ref.high, abs=0.006)
    assert ours.low > 0 and ours.p_bootstrap < 0.05  # a 0.1 gap on 200 correlated questions is clear


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (0, 1), (3, 9), (12, 12), (40, 61), (1500, 1390), (7, 0)])
def test_mcnemar_matches_scipy_binomial_test(a_only, b_only):
    expected = 1.0 if a_only + b_only == 0 else scipy_stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_matches_statsmodels(two_models):
    contingency = pytest.importorskip("statsmodels.stats.contingency_tables")  # in the `dev` extra
    a, b = two_models
    ours = paired_comparison(np.stack([a, a[::-1]]), np.stack([b, b[::-1]]))  # two seeds, pooled
    table = [[0, ours.a_only], [ours.b_only, 0]]  # only the discordant cells enter the exact test
    assert ours.a_only + ours.b_only == int((np.concatenate([a, a[::-1]]) != np.concatenate([b, b[::-1]])).sum())
    assert ours.p_mcnemar == pytest.approx(contingency.mcnemar(table, exact=True).pvalue, rel=1e-9)


def test_seeds_and_questions_are_resampled_crossed():
    """All the variation between seeds, none between questions: seed 0 always right, seed 1 always wrong. Drawing
    two seeds with replacement gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, whatever the questions."""
    x = np.stack([np.ones(50), np.zeros(50)])
    replicates = crossed_bootstrap(x, resamples=40_000, seed=0)
    values, counts = np.unique(replicates, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    ci = bootstrap_ci(x)
    assert (ci.mean, ci.low, ci.high, ci.seeds, ci.questions) == (0.5, 0.0, 1.0, 2, 50)


def test_identical_seeds_give_the_question_bootstrap(two_models):
    a, _ = two_models
    one, three = bootstrap_ci(a, seed=5), bootstrap_ci(np.stack([a, a, a]), seed=5)
    assert three.mean == one.mean and (three.low, three.high) == pytest.approx((one.low, one.high), abs=0.01)


def test_deterministic_given_the_seed(two_models):
    a, b = two_models
    assert paired_comparison(a, b, seed=7) == paired_comparison(a, b, seed=7)
    assert bootstrap_ci(a, seed=7) == bootstrap_ci(a, seed=7)
    x = np.stack([a, b])
    assert np.array_equal(crossed_bootstrap(x, 100, seed=7), crossed_bootstrap(x, 100, seed=7))
    assert not np.array_equal(crossed_bootstrap(x, 100, seed=7), crossed_bootstrap(x, 100, seed=8))


def test_no_difference_has_p_one_and_symmetric_ci():
    x = np.array([1, 0, 1, 1, 0, 1, 0, 1] * 10, dtype=float)
    c = paired_comparison(x, x)
    assert (c.diff, c.low, c.high, c.p_bootstrap, c.a_only, c.b_only, c.p_mcnemar) == (0, 0, 0, 1, 0, 0, 1)


def test_graded_scores_have_no_mcnemar():
    c = paired_comparison([0.2, 0.9, 0.5], [0.1, 0.4, 0.5])
    assert c.p_mcnemar is None and c.a_only is None and c.diff == pytest.approx(1.0 / 3 * (0.1 + 0.5))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model B's scores: expected \[seeds, questions\]"):
        paired_comparison([1, 0], [])
    with pytest.raises(ValueError, match=r"same seeds and questions: shapes \(1, 2\) and \(1, 3\)"):
        paired_comparison([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="1 score\\(s\\) are not finite"):
        score_matrix([1.0, float("nan")])
    with pytest.raises(
        ValueError, match=r"seed #1 scored other questions than seed #0 \(missing \['q2'\], extra \[\]\)"
    ):
        align_questions([{"q1": 1, "q2": 0}, {"q1": 1}])
    ids, m = align_questions([{"b": 1, "a": 0}, {"a": 1, "b": 1}])
    assert ids == ["a", "b"] and m.tolist() == [[0, 1], [1, 1]]


def test_crossed_bootstrap_variance_is_the_two_way_formula():
    """With y = m + a_s + b_q + g_sq (the two-way decomposition, effects summing to zero), the replicates' variance is
    sum(a^2)/S^2 + sum(b^2)/Q^2 + sum(g^2)/(S Q)^2 (derived in merv.report.stats): what the docs' bias statement and
    benchmarks/report_ci_coverage.py rest on."""
    rng = np.random.default_rng(11)
    x = (rng.random((3, 40)) < rng.beta(4, 1, 40)[None] + rng.normal(0, 0.1, (3, 1))).astype(float)
    m, a, b = x.mean(), x.mean(axis=1) - x.mean(), x.mean(axis=0) - x.mean()
    g = x - m - a[:, None] - b[None, :]
    s, q = x.shape
    expected = (a**2).sum() / s**2 + (b**2).sum() / q**2 + (g**2).sum() / (s * q) ** 2
    replicates = crossed_bootstrap(x, resamples=200_000, seed=3)
    assert replicates.mean() == pytest.approx(m, abs=0.002)
    assert replicates.var() == pytest.approx(expected, rel=0.02)
