"""What content addressing costs (issue 19): sharding and eval-cache lookups before and after, from one run.

The code before the change (commit 31ed665 by default, exported with `git archive` into a temporary folder) and the
working tree run the same commands on the same demo data, alternating (old, new, new, old, ...) so that a change in
machine load hits both alike; medians and the ratio new / old are printed:

1. `merv shard` of the demo's stage-2 training split (config/config.yaml's `synth` and the `small` shard set: 1200
   clips, 4 + 8 frames at 64 px, 2 workers) into an empty folder: the new code also hashes every video;
2. the same command again into the finished folder (nothing changed): before, it matched shards by item id; now it
   stats every video and compares item digests;
3. `merv eval` of the 200-question multiple-choice benchmark with every answer in the cache (the pipeline's rerun
   after an unrelated change): the whole command, and the lookup alone (handle + evaluate: the first call in a
   process, and a warm one). The new code digests every weight file (from the stat memo after its first run) and
   checks every record's digest.

Sharding is also timed as `write_shards` alone, in a process that imported torch and decord before (the command
without Python's and torch's imports).

`--plan-items N` also times `snakemake -n` of a training split of N media files (empty files, a JSON listing them)
after its media index exists: the stat refresh a plan makes (the issue asks for under 60 s at 700k).

    python benchmarks/trust_cost.py [--reps 5] [--base 31ed665] [--train-videos 1200] [--plan-items 700000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHARD = r"""
import json, sys, time
from pathlib import Path
import decord, torch  # noqa: F401 - what the workers import first: only sharding is timed
from merv.data.shards import ShardSettings, collect_items, write_shards
src, out, frames, size = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
settings = ShardSettings(frame_counts=tuple(int(f) for f in frames.split(",")), size=size, target_bytes=64 * 2**20)
start = time.perf_counter()
write_shards(collect_items(src), out, settings, workers=2)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

LOOKUP = r"""
import json, sys, time
from pathlib import Path
from merv.eval.benchmark import CheckpointHandle, EvalSettings, evaluate
from merv.eval.cache import ResultCache
ckpt, data, cache = map(Path, sys.argv[1:4])
kwargs = {}
try:  # the new code keeps the weights' digest memo beside the cache, as `merv eval --cache` does
    from merv.digests import DigestMemo
    kwargs["memo"] = DigestMemo(cache / "digests.json")
except ImportError:
    pass
times = []
for _ in range(3):  # the first call also pays lazy imports; the next ones are the lookup itself
    start = time.perf_counter()
    handle = CheckpointHandle(ckpt, **kwargs)
    result = evaluate(handle, data, "synth_mcq", EvalSettings(batch_size=32), ResultCache(cache))
    times.append(time.perf_counter() - start)
    assert result["run"]["answered_by_model"] == 0 and handle.loads == 0, "not a full cache hit"
print(json.dumps({"first": times[0], "warm": min(times[1:])}))
"""


def export_base(commit: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def env_for(code: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def timed(cmd: list[str], code: Path, cwd: Path) -> float:
    """Wall seconds of a command run with ``code`` on the path."""
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env_for(code), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({code}):\n{res.stderr[-3000:]}")
    return seconds


def merv(*args) -> list[str]:
    return [sys.executable, "-m", "merv.cli", *map(str, args)]


def prepare(work: Path, train_videos: int) -> dict:
    """The demo's synthetic data, merv-tiny weights, a checkpoint of the (untrained) model, the benchmark's shards."""
    import torch
    import yaml

    from merv.checkpoint import save_checkpoint
    from merv.config import resolve_run_config
    from merv.data.shards import ShardSettings, collect_items, write_shards
    from merv.data.synth import tokenizer_corpus, write_dataset
    from merv.models.merv import MERV
    from merv.models.tiny import build_tiny_weights

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    synth, small = cfg["synth"], cfg["shards"]["sets"]["small"]
    print(f"rendering the demo data ({train_videos} training clips, {synth['eval_videos']} benchmark clips) ...")
    write_dataset(work / "synth", seed=synth["seed"], train_videos=train_videos, eval_videos=synth["eval_videos"],
                  size=synth["size"], num_frames=synth["frames"], fps=synth["fps"])  # fmt: skip
    weights = work / "weights"
    overrides = {"model": {"encoders": {"vit": {"weights": str(weights / "vit" / "model.safetensors")},
                                        "vivit": {"weights": str(weights / "vivit")}},
                           "llm": {"weights": str(weights / "llm")}}}  # fmt: skip
    run = resolve_run_config("merv-tiny", overrides)
    build_tiny_weights(run, tokenizer_corpus(), seed=0)
    torch.manual_seed(0)
    ckpt = work / "checkpoint"
    meta = {"stage": "finetune", "step": 1, "trained_groups": ["fusion", "projectors"],
            "config_fingerprint": run.fingerprint()}  # fmt: skip
    save_checkpoint(MERV.from_config(run.model), run, ckpt, meta)
    # a config.json both versions read: the old code knows no `revision` field (a location field: the new code's
    # check of config.json against the trained config ignores it)
    config = json.loads((ckpt / "config.json").read_text())
    for part in [*config["model"]["encoders"], config["model"]["llm"]]:
        part.pop("revision", None)
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    bench = work / "shards-mcq"
    settings = ShardSettings(frame_counts=tuple(small["frames"]), size=small["size"])
    write_shards(collect_items(work / "synth" / "eval_data" / "synth_mcq"), bench, settings, workers=2)
    return {"train": work / "synth" / "train" / "finetune.json", "frames": small["frames"], "size": small["size"],
            "checkpoint": ckpt, "bench": bench}  # fmt: skip


def alternate(reps: int, run_old, run_new) -> tuple[list[float], list[float]]:
    old, new = [], []
    for rep in range(reps):
        order = [("old", run_old), ("new", run_new)]
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            (old if name == "old" else new).append(fn())
    return old, new


def plan_time(work: Path, code: Path, items: int) -> tuple[float, float]:
    """Seconds to index a split of ``items`` empty media files (the index job, once) and to plan its shards."""
    import yaml

    big = work / "big"
    for i in range(items):
        folder = big / "v" / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.mp4").touch()
    samples = [{"id": f"s{i}", "video": f"v/{i // 1000:04d}/{i:07d}.mp4",
                "conversations": [{"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "x"}]}
               for i in range(items)]  # fmt: skip
    (big / "train.json").write_text(json.dumps(samples))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["data"]["train"]["big"] = {"json": str(big / "train.json")}
    (work / "plan" / "config").mkdir(parents=True)
    (work / "plan" / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    index = timed(merv("index-media", big / "train.json", "--out", "data/media/train/big.json"), code, work / "plan")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(code / "Snakefile"), "--directory", str(work / "plan"),
           "-n", "--cores", "1", "data/shards/small/train/big"]  # fmt: skip
    return index, timed(cmd, code, work / "plan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--base", default="31ed665", help="commit of the code before the change")
    p.add_argument("--train-videos", type=int, default=1200, help="clips of the training split (the demo's 1200)")
    p.add_argument("--plan-items", type=int, default=0, help="also time planning a split of this many media files")
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--skip-sharding", action="store_true", help="time only the evaluation cache")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="merv-trust-cost-"))
    try:
        old_code = export_base(args.base, work / "base")
        new_code = REPO
        data = prepare(work, args.train_videos)
        rows = []

        def shard(code: Path, out: Path, fresh: bool) -> float:
            """Wall seconds of `merv shard`."""
            if fresh:
                shutil.rmtree(out, ignore_errors=True)
            cmd = merv("shard", data["train"], "--out", out, "--frames", *data["frames"], "--size", data["size"],
                       "--shard-size", "64MB", "--workers", 2, "--no-progress")  # fmt: skip
            return timed(cmd, code, work)

        def write_shards_alone(code: Path, out: Path, fresh: bool) -> float:
            """Seconds of write_shards alone (imports done before)."""
            if fresh:
                shutil.rmtree(out, ignore_errors=True)
            frames = ",".join(map(str, data["frames"]))
            cmd = [sys.executable, "-c", SHARD, str(data["train"]), str(out), frames, str(data["size"])]
            res = subprocess.run(cmd, env=env_for(code), capture_output=True, text=True, cwd=work)
            if res.returncode != 0:
                raise RuntimeError(f"write_shards failed ({code}):\n{res.stderr[-3000:]}")
            return json.loads(res.stdout.strip().splitlines()[-1])["seconds"]

        if not args.skip_sharding:
            print(f"sharding {args.train_videos} clips, {args.reps} times each, alternating ...", flush=True)
        cases = [("into an empty folder", True), ("again (nothing changed)", False)]
        for what, fresh in [] if args.skip_sharding else cases:
            old, new = alternate(args.reps, lambda f=fresh: shard(old_code, work / "s-old", f),
                                 lambda f=fresh: shard(new_code, work / "s-new", f))  # fmt: skip
            rows.append((f"merv shard, {what}: whole command", old, new))
            old, new = alternate(args.reps, lambda f=fresh: write_shards_alone(old_code, work / "w-old", f),
                                 lambda f=fresh: write_shards_alone(new_code, work / "w-new", f))  # fmt: skip
            rows.append((f"merv shard, {what}: write_shards alone", old, new))

        def evaluate_cli(code: Path, cache: Path) -> float:
            cmd = merv("eval", "--model", data["checkpoint"], "--data", data["bench"], "--name", "synth_mcq",
                       "--cache", cache, "--batch-size", 32, "--out", work / "out.json")  # fmt: skip
            return timed(cmd, code, work)

        def lookup(code: Path, cache: Path) -> dict:
            res = subprocess.run([sys.executable, "-c", LOOKUP, str(data["checkpoint"]), str(data["bench"]),
                                  str(cache)], env=env_for(code), capture_output=True, text=True, cwd=work)  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"lookup failed ({code}):\n{res.stderr[-3000:]}")
            return json.loads(res.stdout.strip().splitlines()[-1])

        print("priming both answer caches (200 questions, generation and likelihood) ...", flush=True)
        evaluate_cli(old_code, work / "cache-old")
        evaluate_cli(new_code, work / "cache-new")
        old, new = alternate(args.reps, lambda: evaluate_cli(old_code, work / "cache-old"),
                             lambda: evaluate_cli(new_code, work / "cache-new"))  # fmt: skip
        rows.append(("merv eval, every answer cached (whole command)", old, new))
        old, new = alternate(args.reps, lambda: lookup(old_code, work / "cache-old"),
                             lambda: lookup(new_code, work / "cache-new"))  # fmt: skip
        rows.append(("cache lookup (handle + evaluate), first in a process", [o["first"] for o in old],
                     [n["first"] for n in new]))  # fmt: skip
        rows.append(("cache lookup (handle + evaluate), warm", [o["warm"] for o in old], [n["warm"] for n in new]))

        print(f"\n{'what':56} {'before (s)':>11} {'after (s)':>10} {'ratio':>7}")
        for what, old, new in rows:
            o, n = statistics.median(old), statistics.median(new)
            print(f"{what:56} {o:11.3f} {n:10.3f} {n / o:7.3f}")
        print(f"(medians of {args.reps} alternating runs; base {args.base}, working tree {REPO})")
        if args.plan_items:
            print(f"\nplanning a split of {args.plan_items} media files ...", flush=True)
            index, plan = plan_time(work, new_code, args.plan_items)
            print(
                f"index job (once): {index:.1f} s; `snakemake -n` of its shards (stat refresh included): {plan:.1f} s"
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
