"""Issue-2 check: `make demo` from a fresh clone — wall time against the 15-minute budget, and how far the trained
merv-tiny beats chance on the synthetic multiple-choice benchmark (goal: at least 15 accuracy points).

    python benchmarks/demo_fresh_clone.py [--keep DIR]

Clones the current HEAD into a temporary folder, runs `make demo` there (venv install included) and prints one
summary from that single run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 15 * 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="clone into this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    dest = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="merv-demo-")) / "merv"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    start = time.monotonic()
    res = subprocess.run(["make", "demo"], cwd=dest, capture_output=True, text=True)
    wall = time.monotonic() - start
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"make demo FAILED after {wall:.0f} s")
        return 1
    # the demo runs one seed: its own eval.json has the chance level and the scores per question type
    result = json.loads((dest / "results" / "merv_tiny" / "seed-0" / "eval.json").read_text())
    mcq = result["benchmarks"]["synth_mcq"]
    margin = 100 * (mcq["value"] - mcq["chance"])
    print(f"make demo (fresh clone, venv install included): {wall:.0f} s = {wall / BUDGET_S:.2f} of the 15-min budget")
    print(
        f"synth_mcq accuracy {mcq['value']:.3f} vs chance {mcq['chance']:.3f} (n={mcq['n']}): "
        f"{margin:+.1f} points (goal >= +15), ratio to chance {mcq['value'] / mcq['chance']:.2f}"
    )
    for name, bench in result["benchmarks"].items():
        if name != "synth_mcq":
            print(f"{name}: {bench['metric']} {bench['value']:.3f} (n={bench['n']})")
        by_type = {t: f"{v['metrics'][bench['metric']]:.2f} (n={v['n']})" for t, v in bench.get("by_type", {}).items()}
        print(f"  {name} by question type: {by_type}")
    return 0 if wall <= BUDGET_S and margin >= 15 else 2


if __name__ == "__main__":
    sys.exit(main())
