"""What many tests share: the repository's root, running the real Snakemake on a work folder, and reading the
process tree from /proc (Linux)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state, parent pid, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children and so on (each process's parent as /proc lists it)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(_stat_fields(stat.parent.name)[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError):
            continue  # the process ended while we read
    todo, found = list(children.get(pid, [])), []
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for init, which may never reap it)."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def tool_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with this interpreter's bin folder first on PATH, so the jobs Snakemake
    starts find the same ``merv`` and ``snakemake``."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(
    workdir: Path,
    *args: str,
    snakefile: Path | str = REPO / "Snakefile",
    cores: int | None = 2,
    env: dict | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """``snakemake -s SNAKEFILE [--cores N] ARGS`` run in ``workdir`` (the project folder of the run), as a user
    runs it; ``cores=None`` leaves the cores to a profile."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile)]
    cmd += ["--cores", str(cores)] if cores is not None else []
    return subprocess.run([*cmd, *args], cwd=workdir, capture_output=True, text=True, env=tool_env(env),
                          timeout=timeout)  # fmt: skip


def output(res: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """The end of a run's stdout and stderr, for an assertion's message."""
    return res.stdout[-tail:] + res.stderr[-tail:]


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """Rule -> count from the 'Job stats' table of a dry run."""
    table = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def write_config(workdir: Path, cfg: dict) -> None:
    """``config/config.yaml`` of a work folder."""
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
