"""One training loop for every stage: the stage's config says which module groups learn, on which data, how fast.

schedule -> micro-steps with accumulation (loss normalised by the step's target tokens) -> clip -> step -> log ->
checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from merv.checkpoint import load_checkpoint, save_checkpoint
from merv.config import RunConfig, StageConfig, fingerprint
from merv.data.batching import ExampleBuilder, collate
from merv.data.loader import Position, ShardLoader
from merv.data.shards import read_manifest
from merv.features.cache import open_feature_sets
from merv.models.merv import MERV
from merv.prompting import IGNORE_INDEX
from merv.runtime import runtime_record
from merv.schedule import warmup_cosine
from merv.train.distributed import Dist, all_reduce_sum, all_reduce_sums, barrier, init_distributed
from merv.train.lock import holds_output_lock
from merv.train.metrics import WandbLogger, loss_curve_png, model_flops, peak_flops
from merv.train.state import resume_state, save_state, work_dir
from merv.train.strategy import Strategy
from merv.weights import project_record

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_trainable(model: MERV, groups: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the named module groups, held in fp32 whatever ``model.dtype`` says (the
    optimizer's master weights: AdamW's updates of lr ~2e-5 relative size vanish in 16-bit weights, and its state
    follows the parameters' dtype); encoders always stay frozen."""
    if "encoders" in groups:
        raise ValueError("encoders are frozen in MERV; remove 'encoders' from the stage's trainable list")
    model.requires_grad_(False)
    for group in groups:
        getattr(model, group).float().requires_grad_(True)
    model.train()
    model.encoders.eval()
    return [p for p in model.parameters() if p.requires_grad]


class NonFiniteLoss(ValueError):
    """The loss or the gradient of a step is not finite: the run stops before the update (saved states stay intact)."""


class Preempted(Exception):
    """Raised after a stop was requested (preemption, time limit) and the training state of ``step`` was saved."""

    def __init__(self, step: int):
        super().__init__(f"stopped after saving the training state of step {step}")
        self.step = step


def default_workers(d: Dist) -> int:
    """DataLoader workers per rank when the stage does not say: config ``compute.loader_workers``'s default, never the
    machine's core count (the worker count is part of the sample order; ``merv train --workers`` names it)."""
    from merv.settings import ComputeSection

    return ComputeSection.loader_workers


def build_model(run: RunConfig, stage: StageConfig, init: Path | None) -> tuple[MERV, set[str], str | None]:
    """The model of ``run`` (from ``init``'s checkpoint when given) with the stage's groups trainable; returns
    ``(model, every group trained so far, init's fingerprint)``."""
    model = MERV.from_config(run.model)
    trained_groups, init_fingerprint = set(stage.trainable), None
    if init is not None:
        # stage.init_groups: only these groups of the previous stage carry over (the original's finetune: projectors)
        model, _, init_meta = load_checkpoint(init, model=model, groups=stage.init_groups)
        taken = set(init_meta["trained_groups"])
        trained_groups |= taken if stage.init_groups is None else taken & set(stage.init_groups)
        init_fingerprint = init_meta["config_fingerprint"]
    set_trainable(model, stage.trainable)
    return model, trained_groups, init_fingerprint


def make_loader(
    run: RunConfig, stage: StageConfig, model: MERV, data_dir: Path, d: Dist, features: dict[str, Path]
) -> tuple[ShardLoader, int]:
    """The stage's loader on this rank and the micro-batches per step (gradient accumulation). Encoders with a
    feature cache in ``features`` read it (checked against the config and the shards first); when every encoder has
    one, no video shard is read."""
    per_step = stage.micro_batch_size * d.world_size
    if stage.global_batch_size % per_step:
        raise ValueError(
            f"stage {stage.name!r}: global_batch_size {stage.global_batch_size} is not a multiple of "
            f"micro_batch_size x processes = {per_step}"
        )
    manifest = read_manifest(data_dir)
    feature_sets = open_feature_sets(model.cfg, data_dir, features)
    loader = ShardLoader(
        data_dir,
        transform=ExampleBuilder(model.cfg, model.tokenizer, cached=frozenset(features), text=stage.text),
        collate=collate,
        batch_size=stage.micro_batch_size,
        shuffle_buffer=min(manifest["samples"], stage.shuffle_buffer),
        seed=run.train.seed,
        num_workers=default_workers(d) if stage.num_workers is None else stage.num_workers,
        rank=d.rank,
        world_size=d.world_size,
        feature_sets=feature_sets,
        frames=len(features) < len(model.cfg.encoders),
        pin_memory=str(d.device).startswith("cuda"),
        prefetch=stage.prefetch,
    )
    return loader, stage.global_batch_size // per_step


class StepLog:
    """Per-step records (metrics.jsonl), Weights & Biases, the progress bar and a log line every tenth of the
    stage; a warning when steps wait on data."""

    def __init__(self, run: RunConfig, stage: StageConfig, out: Path, d: Dist, total: int, first: int, progress: bool):
        self.d, self.stage, self.total, self.progress = d, stage, total, progress
        self.home = out.parent.parent if out.parent.name == "train" else out.parent  # results/<model>/train/<stage>
        self.wandb = WandbLogger(self.home, f"{self.home.name}-{stage.name}", run.to_dict()) if d.is_main else None
        self.bar = _progress(total, f"train {stage.name}", progress and d.is_main)
        self.bar.update(first)
        self.waits = 0

    def __call__(self, record: dict) -> None:
        if self.wandb is not None:
            self.wandb.log(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}")
        step = record["step"]
        if record["data_wait_s"] > 0.1 * record["step_s"] and step > 2:
            self.waits += 1
            if self.d.is_main and self.waits in (1, 10, 100):
                log.warning(
                    "step %d waited %.0f%% of its time on data (%d such steps): add DataLoader workers "
                    "(num_workers) or cache the frozen encoders' features (train.features: cached)",
                    step, 100 * record["data_wait_s"] / record["step_s"], self.waits,
                )  # fmt: skip
        if not self.progress and self.d.is_main and step % max(1, self.total // 10) == 0:
            log.info(
                "%s step %d/%d loss %.4f lr %.2e %.1f samples/s, data wait %.0f%%",
                self.stage.name, step, self.total, record["loss"], record["lr"], record["samples_per_s"],
                100 * record["data_wait_s"] / record["step_s"],
            )  # fmt: skip

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.close()


@dataclass
class Stage:
    """What a stage trains with, set up once before resuming: the model as it runs here, its optimizer and schedule,
    the data, and the fingerprint a resumable state must match."""

    run: RunConfig
    stage: StageConfig
    d: Dist
    model: MERV
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: list[torch.nn.Parameter]
    loader: ShardLoader
    accum: int
    total_steps: int
    manifest: dict
    caches: dict[str, str]  # encoder -> its feature cache's fingerprint
    trained_groups: set[str]
    fingerprint: str
    peak: float | None = None  # the device's peak FLOP/s (MFU)


@dataclass
class Progress:
    """Where the stage is: optimizer steps done, the data position after them, their records, samples seen."""

    step: int = 0
    position: Position = field(default_factory=Position)
    metrics: list[dict] = field(default_factory=list)
    samples_seen: int = 0


@holds_output_lock  # one run per output folder: a second one is refused, naming the first's PID and host
def train_stage(
    run: RunConfig,
    stage_name: str,
    data_dir: Path,
    out: Path,
    init: Path | None = None,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
    features: dict[str, Path] | None = None,
) -> dict:
    """Train one stage and write a checkpoint folder to ``out``; returns its meta. ``features`` maps encoders to
    their feature caches (``merv features``): those encoders do not run, their cached outputs are read instead.

    Under ``torchrun`` (N processes) the model is sharded with FSDP2 and each rank reads its own part of the shards;
    a resumable state left by an interrupted run with the same settings is picked up automatically. When ``stop()``
    turns true on any rank, every rank saves the state after the current step and :class:`Preempted` is raised.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer also runs in DataLoader workers
    stage = run.train.stage(stage_name)
    d = init_distributed()
    seed_everything(run.train.seed)
    features = {k: Path(v) for k, v in (features or {}).items()}
    if run.train.features == "cached" and not features and d.is_main:
        log.warning("train.features is 'cached' but no feature caches were given: the encoders run on the fly")
    s = set_up(run, stage, data_dir, init, d, features)
    work = work_dir(out)
    p = resume(s, work)
    stream = s.loader(p.position)
    step_log = StepLog(run, s.stage, out, d, s.total_steps, p.step, progress)
    s.peak, start = peak_flops(), time.time()
    while p.step < s.total_steps:
        step_log(step(s, stream, p))
        periodic = s.stage.checkpoint_every and p.step % s.stage.checkpoint_every == 0
        stopping = stop is not None and all_reduce_sum(float(stop()), d) > 0  # every rank agrees on the step
        if (periodic or stopping) and p.step < s.total_steps:
            extra = {"fingerprint": s.fingerprint, "config": run.to_dict(), "stage": s.stage.name}
            extra |= {"metrics": p.metrics, "samples_seen": p.samples_seen}
            save_state(work, p.step, s.model, s.optimizer, s.scheduler, p.position, extra, s.stage.keep_last, d)
            if stopping:
                step_log.close()
                raise Preempted(p.step)
    meta = stage_meta(s, p, data_dir, out, init, seconds=time.time() - start)
    finish(s, p, meta, out, step_log)
    return meta


def set_up(run: RunConfig, stage: StageConfig, data_dir: Path, init: Path | None, d: Dist, features) -> Stage:
    """The model, how it runs here, its optimizer, the data and the schedule of ``stage``."""
    model, trained_groups, init_fingerprint = build_model(run, stage, init)
    strategy = Strategy(stage, d)
    model = strategy.prepare(model)
    optimizer = strategy.optimizer(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding: the parameters FSDP owns
    loader, accum = make_loader(run, stage, model, data_dir, d, features)
    manifest = read_manifest(data_dir)
    total_steps = max(1, math.ceil(loader.batches_per_epoch(0) * stage.epochs / accum))
    warmup = max(1, math.ceil(stage.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))
    caches = {fs.encoder: fs.manifest["fingerprint"] for fs in loader.opened_caches()}
    config_fingerprint = fingerprint([init_fingerprint, run.to_dict(), manifest["fingerprint"], d.world_size, caches])
    return Stage(
        run, stage, d, model, strategy, optimizer, scheduler, trainable, loader, accum, total_steps, manifest, caches,
        trained_groups, config_fingerprint,
    )  # fmt: skip


def resume(s: Stage, work: Path) -> Progress:
    """Where an interrupted run with the same settings stopped (its newest intact state, verified and loaded into the
    model, optimizer and scheduler; damaged ones are set aside), or the start."""
    found = resume_state(work, s.fingerprint, s.model, s.optimizer, s.scheduler, s.d)
    if found is None:
        return Progress()
    state, first_step, position, resumed = found
    log.info("stage %s: resuming from %s (step %d of %d)", s.stage.name, state, first_step, s.total_steps)
    return Progress(first_step, position, resumed["metrics"], resumed["samples_seen"])


def step(s: Stage, stream, p: Progress) -> dict:
    """One optimizer step over the next ``accum`` micro-batches of ``stream``; advances ``p`` and returns the step's
    record (also appended to ``p.metrics``)."""
    t0 = time.time()
    p.position, micro, counts = next_batches(stream, s.accum, s.d.device)
    data_wait = time.time() - t0
    sums, weights = train_step(
        s.strategy, s.model, s.optimizer, s.trainable, micro, counts, s.stage.grad_clip, s.d, p.step + 1
    )
    s.scheduler.step()
    p.step += 1
    p.samples_seen += int(sums["samples"])
    p.metrics.append(step_record(s, p, sums, weights, data_wait, seconds=max(1e-9, time.time() - t0)))
    return p.metrics[-1]


def step_record(s: Stage, p: Progress, sums: dict, weights, data_wait: float, seconds: float) -> dict:
    """A line of metrics.jsonl (and of Weights & Biases): the step's loss, learning rate, gradient norm, throughput,
    the time it waited on data, MFU and the mean fusion weights."""
    step_tokens = sums["text_tokens"] + sums["videos"] * s.run.model.visual_tokens
    flops_per_s = model_flops(s.model, step_tokens, sums["videos"]) / seconds if s.peak else None
    return {
        "step": p.step,
        "loss": sums["loss"],
        "lr": s.scheduler.get_last_lr()[0],
        "grad_norm": sums["grad_norm"],
        "tokens": int(sums["targets"]),
        "samples": p.samples_seen,
        "step_s": seconds,
        "data_wait_s": data_wait,
        "samples_per_s": sums["samples"] / seconds,
        "tokens_per_s": step_tokens / seconds,
        "mfu": flops_per_s / (s.peak * s.d.world_size) if s.peak else None,
        "fusion_weights": weights.float().mean(0).tolist() if weights is not None else None,
    }


def stage_meta(s: Stage, p: Progress, data_dir: Path, out: Path, init: Path | None, seconds: float) -> dict:
    """The checkpoint's meta.json: what was trained, on which data, how, and where weights were found."""
    return {
        "stage": s.stage.name,
        "step": s.total_steps,
        "samples_seen": p.samples_seen,
        "data_position": {"epoch": p.position.epoch, "batches": p.position.batches},
        "processes": s.d.world_size,
        "workers": s.loader.num_workers,
        "strategy": s.strategy.describe(),
        "precision": precision_record(s.run, s.model, s.optimizer, s.strategy),
        "seed": s.run.train.seed,
        "trained_groups": sorted(s.trained_groups),
        "init": str(init) if init else None,
        "data": {
            "dir": str(data_dir),
            "fingerprint": s.manifest["fingerprint"],
            "samples": s.manifest["samples"],
            "feature_caches": s.caches,
        },
        "config_fingerprint": s.fingerprint,
        "project": project_record(out),  # where relative weight paths were found (see merv.weights)
        "runtime": runtime_record(),  # threads and CPU code path: what the float bytes depend on besides the inputs
        "final_loss": float(np.mean([m["loss"] for m in p.metrics[-max(1, s.total_steps // 10) :]])),
        "seconds": round(seconds, 1),
    }


def finish(s: Stage, p: Progress, meta: dict, out: Path, step_log: StepLog) -> None:
    """Write the checkpoint folder (rank 0; gathered from the shards under FSDP) with the metrics and the loss
    curve, drop the resumable states it supersedes, and wait for every rank."""
    step_log.bar.close()
    full_state = _full_state(s.model, s.strategy)
    if s.d.is_main:
        extra = {
            "metrics.jsonl": "\n".join(json.dumps(m, allow_nan=False) for m in p.metrics),  # strict JSON
            "loss.png": loss_curve_png(p.metrics, f"{step_log.home.name} {s.stage.name}"),
        }
        save_checkpoint(s.model, s.run, out, meta, extra=extra, full_state=full_state)
        shutil.rmtree(work_dir(out), ignore_errors=True)  # the finished checkpoint supersedes the resumable states
        done = (s.stage.name, s.total_steps, meta["final_loss"], meta["seconds"])
        log.info("stage %s: %d steps, final loss %.4f, %.0fs", *done)
    step_log.close()
    barrier(s.d)


def next_batches(stream, accum: int, device: str) -> tuple[Position, list[dict], dict]:
    """The step's ``accum`` micro-batches on ``device``, the data position after them, and their counts (targets,
    samples, video samples, text tokens), read on the host before the copy: no device sync."""
    micro, counts = [], dict.fromkeys(("targets", "samples", "videos", "text_tokens"), 0)
    for _ in range(accum):
        position, batch = next(stream)
        counts["targets"] += int((batch["labels"] != IGNORE_INDEX).sum())
        counts["samples"] += len(batch["lengths"])
        counts["videos"] += int(batch["has_video"].sum())
        counts["text_tokens"] += int(batch["lengths"].sum())
        micro.append(_to(batch, device))
    return position, micro, counts


def train_step(strategy, model, optimizer, trainable, micro: list[dict], counts: dict, clip: float, d: Dist, step: int):
    """Forward and backward of the step's micro-batches, gradient clipping, and the update: unless the loss or the
    gradient is not finite, which stops the run (:class:`NonFiniteLoss`) before the weights change. Returns the
    step's sums over the ranks (``counts``, ``loss`` per target token, ``grad_norm``) and the fusion weights."""
    # the loss is a mean over the target tokens of the whole global batch, on every rank
    targets = all_reduce_sum(counts["targets"], d)
    loss, weights = 0.0, None
    for i, mb in enumerate(micro):  # FSDP averages gradients over ranks: scale by world size / global tokens
        loss_sum, w = strategy.micro_step(model, mb, d.world_size / targets, last=i == len(micro) - 1)
        loss, weights = loss + loss_sum, w if w is not None else weights
    grad_norm = strategy.clip(trainable, clip)
    # one host sync and one collective a step for what is logged; the gradient norm is the same on every rank
    keys = ("samples", "videos", "text_tokens")
    *sums, loss = all_reduce_sums([*(counts[k] for k in keys), float(loss)], d)
    sums = dict(zip(keys, sums, strict=True)) | {"targets": targets, "loss": loss / targets}
    sums["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(sums["loss"]) and math.isfinite(sums["grad_norm"])):
        ids = [k for mb in micro for k in mb["keys"]]
        raise NonFiniteLoss(
            f"step {step}: loss {sums['loss']}, gradient norm {sums['grad_norm']}: not finite, stopped before the "
            f"update (saved states are intact); the step's samples{f' on rank {d.rank}' if d.enabled else ''}: {ids}"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, weights


def precision_record(run: RunConfig, model: MERV, optimizer, strategy: Strategy) -> dict:
    """What meta.json says about precision: the dtypes of the frozen and the trained weights and of the optimizer
    state (as held), of the saved checkpoint, and the compute mode (the stage's strategy)."""
    from merv.runtime import dtype_name

    def names(tensors) -> str:
        return "+".join(sorted({dtype_name(t.dtype) for t in tensors if t.is_floating_point()})) or "none"

    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "weights": names(p for p in model.parameters() if not p.requires_grad),
        "trained_weights": names(p for p in model.parameters() if p.requires_grad),
        "optimizer_state": names(state),
        "checkpoint": run.train.checkpoint_dtype,
        "compute": strategy.describe()["compute"],
    }


def _to(batch: dict, device: str) -> dict:
    if device == "cpu":
        return batch
    return {
        k: (
            {n: t.to(device, non_blocking=True) for n, t in v.items()}
            if isinstance(v, dict)
            else v.to(device, non_blocking=True)
            if isinstance(v, torch.Tensor)
            else v
        )
        for k, v in batch.items()
    }


def _full_state(model: MERV, strategy: Strategy) -> dict | None:
    """The whole (unsharded) state dict, on rank 0 only, gathered from the FSDP shards when the model is sharded."""
    if not strategy.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, mininterval=5, dynamic_ncols=True)
