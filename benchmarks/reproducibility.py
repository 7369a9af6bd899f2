"""What changes the bytes of a CPU run, measured from one run on this machine (docs/reproducibility.md).

    python benchmarks/reproducibility.py [--clips 1200] [--train-videos 64] [--keep DIR]

1. ``merv synth``: the training clips rendered twice, the second time beside two busy processes; files whose bytes
   differ (0 expected).
2. One training stage (merv-tiny's align, on a small synthetic set, through the ``merv train`` CLI) run in fresh
   processes under different conditions, each compared with the first run: the bytes of ``model.safetensors`` and
   the largest absolute weight difference, and the wall time as a ratio to the first run:
   - again (same settings),
   - again beside two busy processes,
   - with OMP_NUM_THREADS/MKL_NUM_THREADS set otherwise (what a scheduler exports),
   - with ``--threads`` changed (a different float sum: different bytes expected),
   - with ``--isa avx2`` (MKL, ATen and oneDNN on their AVX2 code paths: what an AVX2-only machine computes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


class Busy:
    """Two busy-looping processes for the duration of a ``with`` block."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def synth_check(root: Path, clips: int) -> str:
    code = (
        "import sys; from merv.data.synth import write_dataset; "
        "write_dataset(sys.argv[1], seed=0, train_videos={}, eval_videos=4)"
    )
    subprocess.run([sys.executable, "-c", code.format(clips), str(root / "a")], check=True)
    with Busy():
        subprocess.run([sys.executable, "-c", code.format(clips), str(root / "b")], check=True)
    a, b = digests(root / "a"), digests(root / "b")
    differ = sorted(k for k in a if a[k] != b.get(k))
    return f"merv synth, {len(a)} files, second render beside 2 busy processes: {len(differ)} differ {differ[:5]}"


def prepare(root: Path, train_videos: int) -> tuple[str, Path]:
    """A small synthetic set, its align shards and merv-tiny's weights; returns the run config JSON and the shards."""
    from merv.config import resolve_run_config
    from merv.data.shards import ShardSettings, collect_items, write_shards
    from merv.data.synth import tokenizer_corpus, write_dataset
    from merv.models.tiny import build_tiny_weights

    write_dataset(root / "synth", seed=0, train_videos=train_videos, eval_videos=4)
    weights = root / "weights"
    overrides = {"model": {"encoders": {"vit": {"weights": str(weights / "vit" / "model.safetensors")},
                                        "vivit": {"weights": str(weights / "vivit")}},
                           "llm": {"weights": str(weights / "llm")}},
                 "train": {"features": "on_the_fly", "stages": {"align": {"epochs": 2}}}}  # fmt: skip
    run = resolve_run_config("merv-tiny", overrides)
    build_tiny_weights(run, tokenizer_corpus(), seed=0)
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=2_000_000, frame_format="jpg")
    write_shards(collect_items(root / "synth" / "train" / "align.json"), root / "shards", settings)
    return json.dumps(run.to_dict()), root / "shards"


def train(config: str, shards: Path, out: Path, flags: list[str], env: dict | None = None) -> float:
    start = time.monotonic()
    cmd = [sys.executable, "-m", "merv.cli", "train", "--config", config, "--stage", "align", "--data", str(shards),
           "--out", str(out), "--no-progress", *flags]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, **(env or {})))
    return time.monotonic() - start


def compare(a: Path, b: Path) -> str:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    same = (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    return f"{'same bytes' if same else 'different bytes'}, max |diff| {diff:.2e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1200, help="training clips of the synth check")
    parser.add_argument("--train-videos", type=int, default=64, help="clips of the training check")
    parser.add_argument("--keep", help="work in this folder (kept)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="merv-repro-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f}; work in {root}", flush=True)
    print(synth_check(root / "synth-check", args.clips), flush=True)

    config, shards = prepare(root, args.train_videos)
    base = ["--threads", "1", "--isa", "native"]
    first = train(config, shards, root / "first", base)
    print(f"training stage, first run: {first:.0f} s", flush=True)
    cases = [
        ("again", base, None, False),
        ("again, beside 2 busy processes", base, None, True),
        ("OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 exported", base, {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}, False),
        ("--threads 2", ["--threads", "2", "--isa", "native"], None, False),
        ("--isa avx2", ["--threads", "1", "--isa", "avx2"], None, False),
    ]
    for i, (name, flags, env, busy) in enumerate(cases):
        out = root / f"case{i}"
        if busy:
            with Busy():
                seconds = train(config, shards, out, flags, env)
        else:
            seconds = train(config, shards, out, flags, env)
        print(f"{name}: {compare(root / 'first', out)}; time {seconds / first:.2f}x the first run", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
