"""Issue-12 check: the README's miniature commands, timed from a fresh copy of the project on this machine.

    python benchmarks/miniature.py [--local] [--slurm] [--keep DIR]

Copies the project's files (as git sees them) into a temporary folder for each run, then times
  --local: `snakemake results/merv_full/eval.json --configfile config/miniature.yaml` (every core here), and
  --slurm: `make slurm-profile` + `snakemake --profile slurm results/merv_full/eval.json --configfile
           config/miniature.yaml` on the repository's real single-node cluster (scripts/slurm-cluster, started and
           stopped here), counting the Slurm jobs it ran (sacct);
with the built-in synthetic data at its configured size. Prints one summary of the runs (default: both).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = ["results/merv_full/eval.json", "--configfile", "config/miniature.yaml"]


def fresh_copy(dest: Path) -> Path:
    """The project's tracked and untracked-but-not-ignored files, without data or results."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.monotonic()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"{' '.join(cmd)} FAILED after {wall:.0f} s")
    return wall


def summary(workdir: Path) -> str:
    result = json.loads((workdir / "results" / "merv_full" / "eval.json").read_text())
    return ", ".join(f"{b} {r['metric']} {r['value']:.3f} (n={r['n']})" for b, r in result["benchmarks"].items())


def run_local(base: Path, env: dict) -> None:
    workdir = fresh_copy(base / "local")
    wall = timed([sys.executable, "-m", "snakemake", *TARGET], workdir, env)
    print(f"miniature, local (every core): {wall:.0f} s; {summary(workdir)}")


def run_slurm(base: Path, env: dict) -> None:
    workdir = fresh_copy(base / "slurm")
    cluster = base / "cluster"  # others must be able to enter it (MariaDB runs as mysql): not under /root
    cluster.mkdir(mode=0o755)
    env = dict(env, MERV_SLURM_DIR=str(cluster), XDG_CONFIG_HOME=str(base / "xdg"))
    script = str(REPO / "scripts" / "slurm-cluster")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, check=True)
    env["SLURM_CONF"] = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    try:
        subprocess.run(["make", "-C", str(workdir), "slurm-profile"], env=env, capture_output=True, check=True)
        wall = timed([sys.executable, "-m", "snakemake", "--profile", "slurm", *TARGET], workdir, env)
        time.sleep(5)  # accounting trails the jobs by a few seconds
        jobs = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Comment"], env=env,
                              capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
        rules = sum(1 for j in jobs if "|rule_" in j)
        completed = sum(1 for j in jobs if "|COMPLETED|" in j)
        print(f"miniature, --profile slurm: {wall:.0f} s; {len(jobs)} Slurm jobs ({rules} Snakemake jobs, "
              f"{len(jobs) - rules} submitit training jobs), {completed} completed; {summary(workdir)}")  # fmt: skip
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--slurm", action="store_true")
    parser.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="merv-miniature-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    both = not (args.local or args.slurm)
    if args.local or both:
        run_local(base, env)
    if args.slurm or both:
        run_slurm(base, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
