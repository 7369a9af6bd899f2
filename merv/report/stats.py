"""Statistics of the result tables: a mean with its 95% confidence interval over seeds and questions, and paired
comparisons of two models on the same questions. Pure functions of their inputs and a seed, so tables built from
them are the same bytes on every run.

Scores are a matrix ``[seeds, questions]`` (one row per training seed, the same questions in every row, in the same
order; a 1-D array is one seed). A score is a question's correctness (0/1) or any per-question value in [0, 1].

**Confidence interval** (:func:`bootstrap_ci`): a percentile bootstrap over both sources of variation. Seeds and
questions are *crossed* (every seed answers every question), not nested, so each replicate draws the seeds with
replacement and, independently, the questions with replacement, and averages the drawn seeds' rows over the drawn
questions (the two-way "crossed random effects" bootstrap). With one seed it is the usual bootstrap over
questions. Resampling questions separately within each seed would treat the same question as a new one in every
seed and understate the question variance.

Its variance is exactly ``sum(a_s^2)/S^2 + sum(b_q^2)/Q^2 + sum(g_sq^2)/(SQ)^2`` for the two-way decomposition of
``x`` (seed effects ``a``, question effects ``b``, interaction ``g``): under the two-way random-effects model it counts
the between-seed variance ``1 - 1/S`` times and the seed-by-question interaction about ``3 - 2/S`` times. No
resampling scheme is unbiased for crossed data (McCullagh 2000; Owen 2007, "the pigeonhole bootstrap"): the CI is
conservative when seeds agree up to noise and too narrow when a few seeds differ systematically
(``benchmarks/report_ci_coverage.py`` measures both; docs/thesis.md).

**Paired comparison** (:func:`paired_comparison`) of model A and model B trained with the same seeds on the same
questions: the differences ``A - B`` per (seed, question) are bootstrapped as above, giving the mean difference, its
CI and a two-sided p-value (the share of replicates of the centred difference at least as far from 0 as the observed
one); and, for 0/1 scores, the exact McNemar test on the discordant pairs (A right and B wrong, or the reverse)
pooled over seeds: a binomial test of those counts against 1/2. Pooling over seeds treats the pairs as independent,
which they are not quite (the same question in several seeds): the bootstrap p-value, which resamples questions as
units, is the one to read when they disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile-bootstrap CI over ``seeds`` seeds and ``questions`` questions."""

    mean: float
    low: float
    high: float
    seeds: int
    questions: int
    level: float = LEVEL

    def as_dict(self, digits: int = 4) -> dict:
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Comparison:
    """Model A vs model B on the same seeds and questions."""

    mean_a: float
    mean_b: float
    diff: float  # mean of A - B
    low: float  # CI of the difference
    high: float
    p_bootstrap: float  # two-sided, paired bootstrap
    a_only: int | None  # pairs where A is right and B wrong (0/1 scores only)
    b_only: int | None  # ... and the reverse
    p_mcnemar: float | None  # exact McNemar on the discordant pairs, pooled over seeds (0/1 scores only)
    seeds: int
    questions: int
    level: float = LEVEL

    def as_dict(self, digits: int = 4) -> dict:
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}


def score_matrix(scores, what: str = "scores") -> np.ndarray:
    """``scores`` as a float matrix ``[seeds, questions]`` (a 1-D array is one seed), checked: finite, non-empty."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{what}: expected [seeds, questions] with at least one of each, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: {int((~np.isfinite(x)).sum())} score(s) are not finite numbers")
    return x


def _draw_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """``[resamples, n]``: how often each of ``n`` units is drawn when ``n`` are drawn with replacement."""
    draws = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def crossed_bootstrap(x: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``resamples`` bootstrap replicates of the mean of ``x [seeds, questions]``: seeds and questions each drawn
    with replacement, independently (see the module docstring)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    n_seeds, n_questions = x.shape
    seed_counts = _draw_counts(rng, n_seeds, resamples)  # [B, S]
    question_counts = _draw_counts(rng, n_questions, resamples)  # [B, Q]
    # sum over drawn (seed, question) pairs = sum_s seed_count * (question_counts . x[s]); for 0/1 scores every
    # partial sum is an integer, so the replicates are exact whatever the BLAS's order of summation
    return (seed_counts * (question_counts @ x.T)).sum(axis=1) / (n_seeds * n_questions)


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_ci(scores, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Estimate:
    """Mean of ``scores [seeds, questions]`` with its percentile-bootstrap CI over seeds and questions (crossed)."""
    x = score_matrix(scores)
    low, high = _interval(crossed_bootstrap(x, resamples, seed), level)
    return Estimate(float(x.mean()), low, high, x.shape[0], x.shape[1], level)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: ``P(X <= min) * 2`` (capped at 1) for ``X ~
    Binomial(a_only + b_only, 1/2)``, computed in exact integer arithmetic (1.0 when there is no discordant pair)."""
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only}, {b_only}")
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def paired_comparison(a, b, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Comparison:
    """Model A vs model B on the same ``[seeds, questions]``: mean difference with its paired-bootstrap CI and
    p-value, and for 0/1 scores the exact McNemar test on the discordant pairs pooled over seeds."""
    x, y = score_matrix(a, "model A's scores"), score_matrix(b, "model B's scores")
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same seeds and questions: shapes {x.shape} and {y.shape}")
    d = x - y
    replicates = crossed_bootstrap(d, resamples, seed)
    diff = float(d.mean())
    low, high = _interval(replicates, level)
    # centred replicates approximate the difference's distribution under "no difference"
    p_boot = float((1 + np.sum(np.abs(replicates - diff) >= abs(diff) - 1e-12)) / (resamples + 1))
    a_only = b_only = p_mcnemar = None
    if np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all():
        a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        p_mcnemar = mcnemar_exact(a_only, b_only)
    return Comparison(
        float(x.mean()), float(y.mean()), diff, low, high, min(1.0, p_boot), a_only, b_only, p_mcnemar,
        x.shape[0], x.shape[1], level,
    )  # fmt: skip


def align_questions(
    by_seed: list[dict[str, float]], what: str = "results", seeds: list | None = None
) -> tuple[list[str], np.ndarray]:
    """Per-seed ``{question_id: score}`` -> the sorted question ids and the matrix ``[seeds, questions]``; every seed
    must have scored the same questions (else a clear error naming the seeds and the first differing questions).
    ``seeds`` names the seeds in errors (default: their positions, ``#0``, ``#1``, ...)."""
    if not by_seed:
        raise ValueError(f"{what}: no seeds")
    names = [f"seed {s}" for s in seeds] if seeds is not None else [f"seed #{i}" for i in range(len(by_seed))]
    ids = sorted(by_seed[0])
    for name, scores in zip(names[1:], by_seed[1:], strict=True):
        if set(scores) != set(ids):
            missing, extra = sorted(set(ids) - set(scores))[:5], sorted(set(scores) - set(ids))[:5]
            raise ValueError(
                f"{what}: {name} scored other questions than {names[0]} (missing {missing}, extra {extra})"
            )
    return ids, np.array([[scores[q] for q in ids] for scores in by_seed], dtype=np.float64)
