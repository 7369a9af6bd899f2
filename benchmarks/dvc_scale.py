"""DVC on a shard folder of ~10k files (issue 22 item 5): `dvc add`, `dvc status` and `dvc push` to a local remote,
timed in a fresh git + DVC repository, the folder tracked whole and, for comparison, as one .dvc per part folder.

The tars are synthetic (random bytes, `--file-kb` each, with a small JSON index beside each one, as a shard folder
has): DVC's cost is per file and per byte hashed, not per content kind.

Steps (each a fresh `dvc` process, timed from outside):
1. `dvc add` of the folder (hashes every file), 2. `dvc status` with nothing changed (stat cache), 3. `dvc push` to
a local remote (first: every object), 4. `dvc push` again (nothing to send), 5. ten files rewritten, then `dvc
status`, `dvc add` (rehashes only those) and `dvc push` (sends only those).

    python benchmarks/dvc_scale.py [--files 10000] [--file-kb 16] [--parts 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - start


def make_folder(root: Path, files: int, kb: int, parts: int) -> list[Path]:
    """``files`` files (tars and their indexes, half each) spread over ``parts`` part folders."""
    per_part = -(-files // parts)
    paths = []
    for i in range(files // 2):
        part = root / f"part-{(2 * i) // per_part:05d}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"shard-{i:06d}.tar").write_bytes(os.urandom(kb * 1024))
        (part / f"shard-{i:06d}.json").write_text(f'{{"name": "shard-{i:06d}.tar", "samples": 4}}')
        paths.append(part / f"shard-{i:06d}.tar")
    return paths


def measure(layout: str, args, work: Path) -> list[tuple[str, float]]:
    repo, remote = work / layout / "repo", work / layout / "remote"
    repo.mkdir(parents=True)
    remote.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "remote", "add", "-d", "local", str(remote)], repo)
    tars = make_folder(repo / "shards", args.files, args.file_kb, args.parts)
    targets = ["shards"] if layout == "whole" else sorted(str(p.relative_to(repo)) for p in (repo / "shards").iterdir())
    rows = [
        ("dvc add", run(["dvc", "add", "-q", *targets], repo)),
        ("dvc status (nothing changed)", run(["dvc", "status", "-q"], repo)),
        ("dvc push (first)", run(["dvc", "push", "-q", "-j", "4"], repo)),
        ("dvc push (nothing to send)", run(["dvc", "push", "-q", "-j", "4"], repo)),
    ]
    for tar in tars[:: len(tars) // 10][:10]:
        tar.write_bytes(os.urandom(args.file_kb * 1024))
    rows += [
        ("dvc status (10 files changed)", run(["dvc", "status"], repo)),
        ("dvc add (10 files changed)", run(["dvc", "add", "-q", *targets], repo)),
        ("dvc push (10 files changed)", run(["dvc", "push", "-q", "-j", "4"], repo)),
    ]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--file-kb", type=int, default=16)
    p.add_argument("--parts", type=int, default=20, help="part folders (tracked one .dvc each in the second layout)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merv-dvc-scale-"))
    try:
        results = {layout: measure(layout, args, work) for layout in ("whole", "per-part")}
        print(f"{args.files} files ({args.file_kb} kB tars + JSON indexes) in {args.parts} part folders\n")
        print("| step | one .dvc for the folder (s) | one .dvc per part folder (s) |\n|---|---:|---:|")
        for (name, a), (_, b) in zip(results["whole"], results["per-part"], strict=True):
            print(f"| {name} | {a:.1f} | {b:.1f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
