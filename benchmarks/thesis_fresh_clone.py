"""Issues 11 and 21: from a fresh clone, `dvc repro` regenerates the result tables and figures, every reported model
under each seed of report.seeds -- wall time against the 45-minute budget, the time per rule from Snakemake's
benchmark files -- and what the main table says about MERV's thesis, measured:

- the fused model (merv_tiny) beats the best single-encoder model on synth_mcq overall;
- the appearance-only model is good on colour/shape and poor on direction, the motion-only model the reverse;
- the fused model answers the direction questions well above chance.

    python benchmarks/thesis_fresh_clone.py [--keep DIR] [--runs 2 | --against DIR]

Clones the current HEAD into a temporary folder, runs `dvc repro` there with this interpreter's environment (the
venv install is timed by benchmarks/demo_fresh_clone.py) and prints one summary from that single run. With --runs 2
it does it again in a second clone and compares results/tables/*.csv byte for byte; --against DIR compares them
with an earlier run's clone instead (e.g. one run timed on a quiet machine, the second under load: the bytes must
not depend on it). The checks are reported, never tuned: a FAIL is a result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 45 * 60
MOTION = ("first_direction", "last_direction")
APPEARANCE = ("colour", "shape")


def mean(scores: dict, types: tuple[str, ...]) -> float:
    return sum(scores[t] for t in types) / len(types)


def checks(metrics: dict, bench: str = "synth_mcq", chance: float = 0.25) -> list[tuple[str, bool, str]]:
    """The thesis' claims as (claim, holds, numbers) from results/tables/metrics.json."""
    fused, app, mot = (
        {t: v for t, v in metrics[m][bench].items() if isinstance(v, float)}
        for m in ("merv_tiny", "tiny_appearance", "tiny_motion")
    )
    best_single = max(app["all"], mot["all"])
    return [
        (
            "fused beats the best single-encoder model overall",
            fused["all"] > best_single,
            f"{fused['all']:.3f} vs {best_single:.3f}",
        ),
        (
            "appearance-only: appearance questions better than direction",
            mean(app, APPEARANCE) > mean(app, MOTION),
            f"colour/shape {mean(app, APPEARANCE):.3f}, direction {mean(app, MOTION):.3f}",
        ),
        (
            "motion-only: direction questions better than appearance",
            mean(mot, MOTION) > mean(mot, APPEARANCE),
            f"direction {mean(mot, MOTION):.3f}, colour/shape {mean(mot, APPEARANCE):.3f}",
        ),
        (
            "fused: direction well above chance (>= chance + 0.25)",
            mean(fused, MOTION) >= chance + 0.25,
            f"direction {mean(fused, MOTION):.3f} vs chance {chance:.2f}",
        ),
    ]


def rule_seconds(tsv: Path) -> float:
    """A job's wall seconds from its Snakemake benchmark file."""
    import csv

    with tsv.open() as f:
        return sum(float(row["s"]) for row in csv.DictReader(f, delimiter="\t"))


def rule_times(dest: Path) -> list[tuple[str, int, float]]:
    """``(rule, jobs, seconds)`` summed over Snakemake's benchmark files (``benchmark:`` of each computing rule),
    slowest first."""
    totals: dict[str, list] = {}
    for tsv in (dest / "results").rglob("benchmarks/*.tsv"):
        rule = tsv.stem.split("_part-")[0]
        for prefix in ("train_", "eval_", "extract_features", "pretrain_encoder", "shard_train_part",
                       "shard_benchmark", "synth_dataset", "make_tables"):  # fmt: skip
            if tsv.stem.startswith(prefix):
                rule = {"train_": "train_stage", "eval_": "eval_benchmark"}.get(prefix, prefix)
                break
        seconds = rule_seconds(tsv)
        entry = totals.setdefault(rule, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
    return sorted(((r, n, s) for r, (n, s) in totals.items()), key=lambda x: -x[2])


def reproduce(dest: Path) -> tuple[float, subprocess.CompletedProcess]:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(dest),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        DVC_NO_ANALYTICS="1",
    )
    start = time.monotonic()
    res = subprocess.run(["dvc", "repro"], cwd=dest, capture_output=True, text=True, env=env)
    return time.monotonic() - start, res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="clone into this folder (kept) instead of a temporary one")
    second = parser.add_mutually_exclusive_group()
    second.add_argument("--runs", type=int, default=1, choices=(1, 2), help="2: a second clone, tables compared")
    second.add_argument("--against", help="an earlier run's clone (--keep): compare results/tables/*.csv with it")
    args = parser.parse_args()
    dest = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="merv-thesis-")) / "merv"
    wall, res = reproduce(dest)
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"dvc repro FAILED after {wall:.0f} s")
        return 1
    tables = dest / "results" / "tables"
    print(f"dvc repro (fresh clone, {os.cpu_count()} cores): {wall:.0f} s = {wall / BUDGET_S:.2f} of the 45-min budget")
    print("\n| rule | jobs | seconds (sum over jobs) |\n|---|---:|---:|")
    times = rule_times(dest)
    for rule, jobs, seconds in times:
        print(f"| {rule} | {jobs} | {seconds:.0f} |")
    busy = sum(s for _, _, s in times)
    cores = os.cpu_count()
    print(f"\njobs' seconds {busy:.0f} over {wall:.0f} s x {cores} cores: cores busy {busy / wall / cores:.0%}\n")
    for name in ("main.md", "fusion_ablation.md", "paired.md"):
        print((tables / name).read_text())
    pretext = {
        name: json.loads((dest / "data" / "weights" / "pretrained" / name / "pretext.json").read_text())
        for name in ("appearance", "motion")
    }
    for name, report in pretext.items():
        seconds = rule_seconds(dest / "results" / "benchmarks" / f"pretrain_encoder_{name}.tsv")
        print(f"pretext {name}: held-out accuracy {report['held_out_accuracy']} in {seconds:.0f} s")
    held = True
    for claim, ok, numbers in checks(json.loads((tables / "metrics.json").read_text())):
        print(f"{'PASS' if ok else 'FAIL'}  {claim}: {numbers}")
        held &= ok
    same = True
    other = Path(args.against) if args.against else None
    if args.runs == 2:
        other = dest.parent / "second"
        wall2, res2 = reproduce(other)
        if res2.returncode != 0:
            print(f"second dvc repro FAILED after {wall2:.0f} s")
            return 1
        print(f"second run: {wall2:.0f} s")
    if other is not None:
        csvs = sorted(p.name for p in tables.glob("*.csv"))
        differ = [n for n in csvs if (tables / n).read_bytes() != (other / "results/tables" / n).read_bytes()]
        same = not differ
        print(f"results/tables/*.csv ({len(csvs)} files) byte-identical with {other}: {same} {differ}")
    return 0 if wall <= BUDGET_S and held and same else 2


if __name__ == "__main__":
    sys.exit(main())
