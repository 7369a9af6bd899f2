"""How long Snakemake takes to plan a paper-scale training split (issue 22: `snakemake -n` under 60 s at 700k items).

Builds a synthetic Video-LLaVA training JSON of N samples (the JSON only: no video exists, as the issue asks), points
a copy of config/config.yaml at it, and times, in a fresh project folder:

1. `snakemake -n` of the split's shards before anything ran (the plan is not known yet: plan + gather);
2. the plan itself, run by Snakemake (`merv plan-parts` as the checkpoint job: validates every sample, writes each
   part's JSON and media index);
3. `snakemake -n` of the split's shards once the plan exists: every part job planned (the number printed), with the
   media restat of every part's index and the part digests that key the part jobs;
4. the same dry run of `results/merv_full/eval.json` (the paper model on this split for both stages: fetch weights,
   two splits' parts, benchmarks, training, evaluation).

    python benchmarks/plan_scale.py [--items 700000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_split(path: Path, items: int) -> None:
    """Samples shaped like Valley-702k's: an id, a video path in a two-level folder tree, a two-turn conversation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("[")
        for i in range(items):
            sample = {
                "id": f"v{i:07d}",
                "video": f"videos/{i // 10000:03d}/{i:07d}.mp4",
                "conversations": [
                    {"from": "human", "value": "<video>\nDescribe what happens in this video in detail."},
                    {"from": "gpt", "value": f"A short synthetic description of clip {i}."},
                ],
            }
            f.write(("," if i else "") + json.dumps(sample))
        f.write("]")


def timed(cmd: list, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return seconds, res.stdout + res.stderr


def job_counts(out: str) -> dict[str, int]:
    table = out.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=700_000)
    p.add_argument("--work", help="project folder to use (default: a temporary one, removed at the end)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="merv-plan-scale-"))
    try:
        start = time.perf_counter()
        write_split(work / "big" / "train.json", args.items)
        size = (work / "big" / "train.json").stat().st_size
        took = time.perf_counter() - start
        print(f"training JSON: {args.items} samples, {size / 1e6:.0f} MB, written in {took:.1f} s")
        cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        cfg["data"]["train"] = {"align": {"json": "big/train.json"}, "finetune": {"json": "big/train.json"}}
        (work / "config").mkdir(exist_ok=True)
        (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
        smk = [sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "--cores", "1"]
        target = "data/shards/paper/train/align"
        rows = []

        seconds, out = timed([*smk, "-n", target], work)
        rows.append(("dry run, no plan yet", seconds, job_counts(out)))
        seconds, out = timed([*smk, "data/media/train/align"], work)
        parts = json.loads((work / "data/media/train/align/parts.json").read_text())["parts"]
        rows.append((f"plan job ({len(parts)} parts of {cfg['shards']['items_per_part']})", seconds, {}))
        seconds, out = timed([*smk, "-n", target], work)
        rows.append(("dry run of the split's shards, planned", seconds, job_counts(out)))
        seconds, out = timed([*smk, "data/media/train/finetune"], work)
        seconds, out = timed([*smk, "-n", "results/merv_full/eval.json"], work)
        rows.append(("dry run of results/merv_full/eval.json", seconds, job_counts(out)))

        print(f"\n{'step':<42} {'seconds':>8}  jobs")
        for name, seconds, jobs in rows:
            shown = ", ".join(f"{k} {v}" for k, v in jobs.items() if k != "all")
            print(f"{name:<42} {seconds:>8.1f}  {shown}")
        print(f"\n`snakemake -n` of a planned {args.items}-sample split: {rows[2][1]:.1f} s (target < 60 s)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
