"""Issue-11 check: from a fresh clone, `dvc repro` regenerates the result tables and figures — wall time against the
40-minute budget — and what the main table says about MERV's thesis, measured:

- the fused model (merv_tiny) beats the best single-encoder model on synth_mcq overall;
- the appearance-only model is good on colour/shape and poor on direction, the motion-only model the reverse;
- the fused model answers the direction questions well above chance.

    python benchmarks/thesis_fresh_clone.py [--keep DIR]

Clones the current HEAD into a temporary folder, runs `dvc repro` there with this interpreter's environment (the
venv install is timed by benchmarks/demo_fresh_clone.py) and prints one summary from that single run. The checks are
reported, never tuned: a FAIL is a result.
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
BUDGET_S = 40 * 60
MOTION = ("first_direction", "last_direction")
APPEARANCE = ("colour", "shape")


def mean(scores: dict, types: tuple[str, ...]) -> float:
    return sum(scores[t] for t in types) / len(types)


def checks(metrics: dict, bench: str = "synth_mcq", chance: float = 0.25) -> list[tuple[str, bool, str]]:
    """The thesis' claims as (claim, holds, numbers) from results/tables/metrics.json."""
    fused, app, mot = (metrics[m][bench] for m in ("merv_tiny", "tiny_appearance", "tiny_motion"))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="clone into this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    dest = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="merv-thesis-")) / "merv"
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
    wall = time.monotonic() - start
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"dvc repro FAILED after {wall:.0f} s")
        return 1
    tables = dest / "results" / "tables"
    print(f"dvc repro (fresh clone, {os.cpu_count()} cores): {wall:.0f} s = {wall / BUDGET_S:.2f} of the 40-min budget")
    print((tables / "main.md").read_text())
    print((tables / "fusion_ablation.md").read_text())
    pretext = {
        name: json.loads((dest / "data" / "weights" / "pretrained" / name / "pretext.json").read_text())
        for name in ("appearance", "motion")
    }
    for name, report in pretext.items():
        print(f"pretext {name}: held-out accuracy {report['held_out_accuracy']} in {report['seconds']} s")
    held = True
    for claim, ok, numbers in checks(json.loads((tables / "metrics.json").read_text())):
        print(f"{'PASS' if ok else 'FAIL'}  {claim}: {numbers}")
        held &= ok
    return 0 if wall <= BUDGET_S and held else 2


if __name__ == "__main__":
    sys.exit(main())
