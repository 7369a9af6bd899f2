"""What trustworthy resume costs (issue 19): save + find + load of a training state, before and after the manifest.

    python benchmarks/trust_resume_cost.py                  # the demo model (merv-tiny, stage 2), 200 cycles
    python benchmarks/trust_resume_cost.py --cycles 500 --base 31ed665

The code before the change is the ``--base`` commit's ``merv`` package, extracted with ``git archive`` into a temporary
folder; the code after is this checkout's. Each runs in a subprocess of its own (two ``merv`` packages cannot share one
process) that builds the demo model with the stage's trainable groups and takes one optimizer step (so the optimizer
has its state). The two then run their cycles in turn, one cycle each, the order alternating, so that both see the
same load on the machine; each cycle times:

- ``save``: ``save_state`` (after: plus the digests and the manifest);
- ``find``: ``latest_state`` (after: plus the manifest check of every file, the restricted parse of the metadata and
  of every non-tensor value);
- ``load``: ``load_state`` (after: through the verified reader and the weights_only planner).

The script prints the median (and fastest) of each phase and the ratios after / before. The issue's bound: the resume
cycle (save + find + load) within 5%. Then the user's view: the demo's stage 2 with a state every 2 steps, stopped
after 6 of its 12 steps and run again to resume (``--stages`` runs of each, alternating), timed as a whole.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
from pathlib import Path

import torch

from merv.config import run_config_from_dict
from merv.data.loader import Position
from merv.models.merv import MERV
from merv.train.loop import set_trainable, warmup_cosine
from merv.train.state import latest_state, load_state, save_state
from merv.train.strategy import make_optimizer

config, work = json.loads(sys.argv[1]), Path(sys.argv[2])
run = run_config_from_dict(config)
stage = run.train.stage("finetune")
torch.manual_seed(0)
model = MERV.from_config(run.model)
params = set_trainable(model, stage.trainable)
optimizer = make_optimizer(model, stage)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, 100, 3))
for p in params:  # one step, so that the optimizer has its moments
    p.grad = torch.randn_like(p) * 1e-3
optimizer.step()
scheduler.step()
extra = {"fingerprint": "bench", "config": config, "stage": "finetune", "metrics": [], "samples_seen": 0}
print("ready", flush=True)
for i, _ in enumerate(sys.stdin):  # one save/find/load cycle per line the driver sends
    t0 = time.perf_counter()
    save_state(work, i + 1, model, optimizer, scheduler, Position(0, i), extra, keep_last=2)
    t1 = time.perf_counter()
    folder = latest_state(work, "bench")
    t2 = time.perf_counter()
    assert folder is not None and folder.name.endswith(f"{i + 1:08d}"), folder
    load_state(folder, model, optimizer, scheduler)
    t3 = time.perf_counter()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(json.dumps({"save": t1 - t0, "find": t2 - t1, "load": t3 - t2, "state_bytes": size}), flush=True)
"""


STAGE = r"""
import json, shutil, sys, time
from pathlib import Path

from merv.config import run_config_from_dict
from merv.train.loop import Preempted, train_stage

config, data, out, stop_at = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
run = run_config_from_dict(config)
calls = [0]


def stop() -> bool:
    calls[0] += 1
    return calls[0] >= stop_at


t0 = time.perf_counter()
try:
    train_stage(run, "finetune", data, out, progress=False, stop=stop)
except Preempted:
    pass
t1 = time.perf_counter()
train_stage(run, "finetune", data, out, progress=False)  # resumes from the state saved at the stop
t2 = time.perf_counter()
print(json.dumps({"stopped": t1 - t0, "resumed": t2 - t1, "total": t2 - t0}))
"""


def demo_shards(tmp: Path, config: dict) -> Path:
    """The demo's stage-2 data (the synthetic clips, sharded as the pipeline shards them)."""
    from merv.data.shards import ShardSettings, collect_items, write_shards
    from merv.data.synth import write_dataset

    write_dataset(tmp / "synth", seed=1, train_videos=12, eval_videos=2)
    encoders = config["model"]["encoders"]
    settings = ShardSettings(
        frame_counts=tuple(e["num_frames"] for e in encoders), size=max(e["image_size"] for e in encoders)
    )
    write_shards(collect_items(tmp / "synth" / "train" / "finetune.json"), tmp / "shards", settings)
    return tmp / "shards"


def stage_run(code: Path, config: dict, data: Path, out: Path, stop_at: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    args = [sys.executable, "-c", STAGE, json.dumps(config), str(data), str(out), str(stop_at)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=out.parent)
    if done.returncode != 0:
        raise SystemExit(f"the stage on {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extract_base(commit: str, dest: Path) -> Path:
    """The ``merv`` package as it was at ``commit`` (read-only use: nothing in the checkout changes)."""
    archive = dest / "base.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), commit, "merv"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "base", filter="data")
    return dest / "base"


def demo_config(tmp: Path) -> dict:
    from merv.config import resolve_run_config
    from merv.data.synth import tokenizer_corpus
    from merv.models.tiny import build_tiny_weights

    overrides = {
        "model": {
            "encoders": {"vit": {"weights": str(tmp / "vit.safetensors")}, "vivit": {"weights": str(tmp / "vivit")}},
            "llm": {"weights": str(tmp / "llm")},
        }
    }
    run = resolve_run_config("merv-tiny", overrides)
    build_tiny_weights(run, tokenizer_corpus())
    return run.to_dict()


class Worker:
    """A subprocess with one ``merv`` package on its path, doing one save/find/load cycle per request."""

    def __init__(self, code: Path, config: dict, work: Path):
        env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(config), str(work)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=work.parent,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the worker on {code} did not start")

    def cycle(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("a worker failed (run it by hand to see why)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="31ed665", help="the commit before the change (default 31ed665)")
    p.add_argument("--cycles", type=int, default=200, help="save/find/load cycles of each, interleaved")
    p.add_argument("--stages", type=int, default=5, help="stopped-and-resumed demo stages of each, alternating")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="merv-bench-resume-") as tmp:
        tmp = Path(tmp)
        codes = {"before": extract_base(args.base, tmp), "after": REPO}
        config = demo_config(tmp / "weights")
        workers = {}
        for name, code in codes.items():
            (tmp / name).mkdir()
            workers[name] = Worker(code, config, tmp / name / "finetune.work")
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(args.cycles + 5):  # both run under the same load: cycles alternate, in alternating order
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                row = workers[name].cycle()
                if r >= 5:  # the first cycles warm caches: not counted
                    results[name].append(row)
        for worker in workers.values():
            worker.close()
        # the user's view: the demo's stage 2 with a state every 2 steps, stopped halfway, then run again to resume
        stage_config = json.loads(json.dumps(config))
        for stage in stage_config["train"]["stages"]:
            if stage["name"] == "finetune":
                stage.update(epochs=4, global_batch_size=4, micro_batch_size=2, checkpoint_every=2)
        data = demo_shards(tmp / "demo", config) if args.stages else None
        stages: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(args.stages):
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                (tmp / f"stage-{name}-{r}").mkdir()
                out = tmp / f"stage-{name}-{r}" / "finetune"
                stages[name].append(stage_run(codes[name], stage_config, data, out, stop_at=6))
        for rows in results.values():
            for row in rows:
                row["resume"] = row["save"] + row["find"] + row["load"]
        stats = {
            how: {
                name: {k: fn([x[k] for x in rows]) for k in ("save", "find", "load", "resume")}
                for name, rows in results.items()
            }
            for how, fn in (("median", statistics.median), ("fastest", min))
        }
        state_mb = results["after"][0]["state_bytes"] / 2**20
    print(f"demo model (merv-tiny, stage 2 trainable state {state_mb:.1f} MiB), {args.cycles} cycles of each; ms")
    print(f"{'phase':<8}{'median before':>15}{'after':>8}{'ratio':>8}{'fastest before':>17}{'after':>8}{'ratio':>8}")
    for phase in ("save", "find", "load", "resume"):
        row = f"{phase:<8}"
        for how, width in (("median", 15), ("fastest", 17)):
            b, a = stats[how]["before"][phase], stats[how]["after"][phase]
            row += f"{1000 * b:>{width}.1f}{1000 * a:>8.1f}{a / b:>8.3f}"
        print(row)
    for how in ("median", "fastest"):
        ratio = stats[how]["after"]["resume"] / stats[how]["before"]["resume"]
        print(f"resume (save + find + load), {how}: after / before = {ratio:.3f} "
              f"({'within' if ratio <= 1.05 else 'over'} 5%)")  # fmt: skip
    if args.stages:
        print(f"\nthe demo's stage 2 (12 steps, a state every 2), stopped after 6, resumed; {args.stages} of each; s")
        print(f"{'run':<10}{'median before':>15}{'after':>8}{'ratio':>8}")
        for phase in ("stopped", "resumed", "total"):
            b, a = (statistics.median(x[phase] for x in stages[n]) for n in ("before", "after"))
            print(f"{phase:<10}{b:>15.2f}{a:>8.2f}{a / b:>8.3f}")


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"({time.time() - start:.0f} s)")
