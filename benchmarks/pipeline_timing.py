"""Per-rule wall time of the default pipeline, from one run in a fresh clone.

    python benchmarks/pipeline_timing.py [--rev REV] [--keep DIR] [--dvc] [--cores 2] [--configfile PATCH.yaml]

Clones REV (default HEAD) into a temporary folder (or DIR), runs ``snakemake --cores N`` there (``--dvc``: ``dvc
repro``) with this interpreter's environment, and prints one table from that single run: per rule the number of
jobs, their summed and longest wall time, and the share of the summed job time; then the run's total wall time.
Job times come from Snakemake's own log (``.snakemake/log/*.snakemake.log``: the timestamp before each ``rule X:``
and before its ``Finished jobid``; 1 s resolution), so no rule needs a ``benchmark:`` file. Jobs that run side by
side overlap: their sum can exceed the wall time. CPU seconds come from the line every ``merv`` command logs at its
end (user + system time of the job's processes): on a busy machine they stay close to what the job would take alone
on a quiet one (one-thread jobs), where wall times grow with the load.

``--table FILE`` also writes the table as Markdown. Measurements on a shared machine are noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")
START = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):")
JOBID = re.compile(r"^\s+jobid: (\d+)")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)")
LOG = re.compile(r"^\s+log: (\S+)")
CPU = re.compile(r"merv \S+: cpu ([0-9.]+) s")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)")


def parse_log(text: str) -> list[dict]:
    """Jobs of one Snakemake log: ``{rule, wildcards, start, end, seconds}`` (end/seconds None when unfinished)."""
    jobs: dict[str, dict] = {}
    when, current = None, None
    for line in text.splitlines():
        if m := STAMP.match(line):
            when = datetime.strptime(" ".join(m[1].split()), "%a %b %d %H:%M:%S %Y")
            current = None
        elif m := START.match(line):
            current = {"rule": m[1], "wildcards": "", "start": when, "end": None}
        elif current is not None and (m := JOBID.match(line)):
            jobs[m[1]] = current
        elif current is not None and (m := WILDCARDS.match(line)):
            current["wildcards"] = m[1]
        elif current is not None and (m := LOG.match(line)):
            current["log"] = m[1]
        elif (m := FINISHED.match(line)) and m[1] in jobs:
            jobs[m[1]]["end"] = when
    for job in jobs.values():
        job["seconds"] = (job["end"] - job["start"]).total_seconds() if job["end"] else None
    return list(jobs.values())


def job_cpu(job: dict, root: Path) -> float | None:
    """CPU seconds a job's ``merv`` command reported at its end (the last such line of its log), if any."""
    log = root / job.get("log", "-")
    if not log.is_file():
        return None
    found = CPU.findall(log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def rule_table(jobs: list[dict], root: Path) -> list[dict]:
    """Per rule: jobs, summed and longest wall seconds, summed CPU seconds, in order of summed wall time."""
    by_rule: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        if job["seconds"] is not None and job["rule"] != "all":
            by_rule[job["rule"]].append(job["seconds"])
            if (c := job_cpu(job, root)) is not None:
                cpu[job["rule"]].append(c)
    total = sum(sum(v) for v in by_rule.values()) or 1.0
    rows = [
        {"rule": r, "jobs": len(v), "sum_s": sum(v), "max_s": max(v), "share": sum(v) / total,
         "cpu_s": sum(cpu[r]) if len(cpu[r]) == len(v) else None}
        for r, v in by_rule.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -r["sum_s"])


def markdown(rows: list[dict], wall: float | None) -> str:
    lines = [
        "| rule | jobs | wall, sum (s) | wall, longest (s) | share of job wall time | CPU, sum (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = "" if r["cpu_s"] is None else f"{r['cpu_s']:.0f}"
        lines.append(
            f"| {r['rule']} | {r['jobs']} | {r['sum_s']:.0f} | {r['max_s']:.0f} | {100 * r['share']:.1f}% | {cpu} |"
        )
    jobs_total = sum(r["sum_s"] for r in rows)
    cpu_total = sum(r["cpu_s"] or 0 for r in rows)
    lines.append(f"| **all jobs** | {sum(r['jobs'] for r in rows)} | {jobs_total:.0f} | | 100% | {cpu_total:.0f} |")
    if wall is not None:
        lines.append(f"\nWall time of the run: {wall:.0f} s ({wall / 60:.1f} min).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="commit to clone (default HEAD)")
    parser.add_argument("--keep", help="clone into this folder (kept) instead of a temporary one")
    parser.add_argument("--dvc", action="store_true", help="run `dvc repro` instead of `snakemake`")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configfile", help="a config patch passed to snakemake (not with --dvc)")
    parser.add_argument("--table", help="also write the Markdown table here")
    parser.add_argument("--logs-only", help="only parse the Snakemake logs of this existing run folder")
    args = parser.parse_args()

    wall = None
    if args.logs_only:
        dest = Path(args.logs_only)
    else:
        dest = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="merv-timing-")) / "merv"
        subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
        subprocess.run(["git", "-C", str(dest), "checkout", "-q", args.rev], check=True)
        env = dict(
            os.environ,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            PYTHONPATH=str(dest),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            WANDB_MODE="offline",
            DVC_NO_ANALYTICS="1",
        )
        if args.dvc:
            cmd = ["dvc", "repro"]
        else:
            cmd = ["snakemake", "--cores", str(args.cores)]
            if args.configfile:
                cmd += ["--configfile", str(Path(args.configfile).resolve())]
        print(f"{dest}: {' '.join(cmd)} (rev {args.rev})", flush=True)
        loads, done = [], threading.Event()

        def sample_load():  # how busy the machine was: other processes slow every job
            while not done.wait(15):
                loads.append(os.getloadavg()[0])

        threading.Thread(target=sample_load, daemon=True).start()
        start = time.monotonic()
        res = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
        wall = time.monotonic() - start
        done.set()
        if loads:
            print(f"1-min load average during the run: mean {sum(loads) / len(loads):.2f}, max {max(loads):.2f}")
        (dest / "timing-run.log").write_text(res.stdout + res.stderr)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            print(f"FAILED after {wall:.0f} s (exit {res.returncode})")
    jobs = [
        j for log in sorted((dest / ".snakemake" / "log").glob("*.snakemake.log")) for j in parse_log(log.read_text())
    ]
    table = markdown(rule_table(jobs, dest), wall)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
