"""Issue 21: how often the report's 95% CIs (merv.report.stats, the crossed bootstrap over seeds and questions) hold
the true mean, on simulated 0/1 scores of the report's shape (3 seeds x 600 questions), printed from one run.

    python benchmarks/report_ci_coverage.py [--trials 200] [--seeds 3] [--questions 600]

Three kinds of variation, each simulated afresh per trial around a true accuracy of 0.8:

- ``seed x question``: every (seed, question) an independent draw (which questions a seed gets right is noise);
- ``question``: each question has its own difficulty (drawn per trial), the seeds agree up to noise;
- ``seed + question``: as ``question``, plus a per-seed shift of the accuracy (sd 0.05, each model its own).

For each: the share of trials whose CI holds 0.8 (nominal 0.95), the mean CI width, and the width a normal 95%
interval of the true standard deviation would have (from the simulated means). Also for the paired test: the share
of trials with p < 0.05 for two models of equal accuracy (nominal 0.05), bootstrap and pooled McNemar.

The crossed bootstrap's variance counts the seed-by-question interaction about 3 - 2/S times and the between-seed
variance (1 - 1/S) times (see merv/report/stats.py): too wide when the interaction dominates, too narrow when seeds
differ systematically and there are few of them. No resampling scheme is unbiased for crossed designs (McCullagh
2000); this measures what that means here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merv.report.stats import bootstrap_ci, paired_comparison  # noqa: E402

TRUTH = 0.8


def probabilities(kind: str, rng: np.random.Generator, seeds: int, questions: int) -> tuple[np.ndarray, np.ndarray]:
    """Each (seed, question)'s chance of a right answer, for two models of the same accuracy: the same questions'
    difficulties, each model's seeds their own shifts."""
    if kind == "seed x question":
        return np.full((seeds, questions), TRUTH), np.full((seeds, questions), TRUTH)
    difficulty = np.repeat(rng.beta(4, 1, questions)[None], seeds, axis=0)  # mean 0.8
    if kind == "question":
        return difficulty, difficulty
    return tuple(np.clip(difficulty + rng.normal(0, 0.05, (seeds, 1)), 0, 1) for _ in range(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=600)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(2025)
    shape = (args.seeds, args.questions)
    print(f"{args.trials} trials of {args.seeds} seeds x {args.questions} questions, {args.resamples} replicates each")
    print("variation        | CI coverage | mean width | true 95% width | p<0.05, equal models: bootstrap, McNemar")
    for kind in ("seed x question", "question", "seed + question"):
        hits, widths, means, false_boot, false_mcnemar = 0, [], [], 0, 0
        for trial in range(args.trials):
            p, q = probabilities(kind, rng, *shape)
            a = (rng.random(shape) < p).astype(float)
            e = bootstrap_ci(a, resamples=args.resamples, seed=trial)
            hits += e.low <= TRUTH <= e.high
            widths.append(e.high - e.low)
            means.append(e.mean)
            b = (rng.random(shape) < q).astype(float)  # a second model of the same accuracy: no difference
            c = paired_comparison(a, b, resamples=args.resamples, seed=trial)
            false_boot += c.p_bootstrap < 0.05
            false_mcnemar += c.p_mcnemar < 0.05
        true_width = 2 * 1.96 * float(np.std(means))
        print(f"{kind:16} | {hits / args.trials:11.3f} | {np.mean(widths):10.4f} | {true_width:14.4f} | "
              f"{false_boot / args.trials:.3f}, {false_mcnemar / args.trials:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
