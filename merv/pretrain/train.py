"""Pretrain one tiny encoder on its pretext task, save it the way real weights ship, and check it loads back.

The encoder is trained *inside* the same wrapper MERV uses (:mod:`merv.models.encoders`: its ``transform``, its patch
tokens with CLS/registers dropped), with a linear head on its mean-pooled patch tokens, so what the head learned to
read is in the tokens MERV's projectors pool. The head is thrown away; the encoder is saved through the real paths
(timm: a safetensors state dict loaded by timm's pretrained loader; ViViT: a ``save_pretrained`` folder with
``preprocessor_config.json``), loaded back through them, and must give the same features.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from merv.config import EncoderConfig
from merv.models.encoders import VisualEncoder, build_encoder
from merv.models.tiny import init_encoder, save_encoder
from merv.pretrain.config import PretrainConfig
from merv.pretrain.data import label_classes, pretext_batch
from merv.runtime import runtime_record
from merv.schedule import warmup_cosine

log = logging.getLogger(__name__)

REPORT = "pretext.json"
CURVE = "pretext.png"  # the curves of pretext.json


def tubelet_frames(encoder: VisualEncoder) -> int:
    """Frames per temporal position of the encoder's output (1 for per-frame encoders)."""
    return encoder.num_frames // encoder.temporal_positions


class PretextHead(nn.Module):
    """Linear heads on the encoder's patch tokens: per token for ``*_map`` labels (what the patch shows) and
    ``*_mask`` labels (the object's mask inside the patch), else on attention-pooled tokens (one learned query over
    the N spatial tokens), per clip (appearance) or per temporal position (motion)."""

    def __init__(self, dim: int, classes: dict[str, int], per_position: bool):
        super().__init__()
        self.per_position = per_position
        self.pooled = {k for k in classes if not k.endswith(("_map", "_mask"))}
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in classes.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, T', N, C]`` -> logits ``[B, T', N, K]`` (maps), ``[B, T', K]`` (per position) or ``[B, K]``."""
        x = self.norm(features)
        weights = (x @ self.query / math.sqrt(x.shape[-1])).softmax(dim=2)  # [B, T', N]
        pooled = (weights.unsqueeze(-1) * x).sum(dim=2)  # [B, T', C]
        if not self.per_position:
            pooled = pooled.mean(dim=1)
        return {name: head(pooled if name in self.pooled else x) for name, head in self.heads.items()}


def prepare(encoder: VisualEncoder, frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, T, S, S, 3]`` -> ``[B, T, 3, S_e, S_e]`` through the encoder's own transform (as MERV feeds it)."""
    return torch.stack([encoder.transform(clip) for clip in frames])


def pretext_loss(
    logits: dict[str, torch.Tensor], labels: dict[str, np.ndarray], weights: dict[str, float] | None = None
) -> torch.Tensor:
    """Cross-entropy of every class label, binary cross-entropy of every mask cell, summed with ``weights`` (1 for a
    label they do not name; a label of weight 0 is not computed)."""
    total = 0.0
    for k, lg in logits.items():
        weight = (weights or {}).get(k, 1.0)
        if not weight:
            continue
        target = torch.as_tensor(labels[k])
        if k.endswith("_mask"):
            total = total + weight * F.binary_cross_entropy_with_logits(lg, target)
        else:
            total = total + weight * F.cross_entropy(lg.flatten(0, -2), target.flatten())
    return total


def hits(logits: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy per label; for token maps over the object's tokens only (background tokens are the easy majority),
    for masks the intersection over union of predicted and true object cells."""
    out = {}
    for k, lg in logits.items():
        true = labels[k]
        if k.endswith("_mask"):
            pred = lg.detach().numpy() > 0
            out[k] = float((pred & (true > 0)).sum() / max(1, (pred | (true > 0)).sum()))
            continue
        pred = lg.detach().argmax(-1).numpy()
        keep = true > 0 if k.endswith("_map") else np.ones_like(true, dtype=bool)
        out[k] = float((pred[keep] == true[keep]).mean())
    return out


@torch.no_grad()
def accuracy(encoder: VisualEncoder, head: PretextHead, batch, frames: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out accuracy of every label (``frames``: the batch already prepared, to prepare it once)."""
    encoder.eval()
    head.eval()
    return hits(head(encoder(prepare(encoder, batch.frames) if frames is None else frames)), batch.labels)


def curve_steps(steps: int, points: int) -> set[int]:
    """The steps after which held-out accuracy is measured: ``points`` evenly spaced, the last one included."""
    n = min(points, steps)
    return {round(steps * (i + 1) / n) for i in range(n)}


def curve_png(report: dict, title: str) -> bytes:
    """Held-out accuracy of each label over the steps (chance dotted), and the training loss, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lax) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [p["step"] for p in report["curve"]]
    for i, label in enumerate(report["curve"][0]["accuracy"]):
        if label.endswith("_mask"):
            continue
        colour = f"C{i}"
        ax.plot(steps, [p["accuracy"][label] for p in report["curve"]], color=colour, marker=".", label=label)
        ax.axhline(report["chance"][label], color=colour, linestyle=":", linewidth=1)
    ax.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1), title=f"{title}: held-out accuracy (chance dotted)")
    ax.legend(fontsize=8)
    losses = np.asarray(report["losses"])
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    lax.plot(np.arange(window, len(losses) + 1), smooth)
    lax.set(xlabel="step", ylabel="training loss", yscale="log", title=f"training loss ({window}-step mean)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def pretrain_encoder(cfg: PretrainConfig, out: str | Path) -> dict:
    """Train ``cfg``'s encoder, write it to ``out`` (weights + ``pretext.json``), return the report. Its threads and
    CPU code path are the process's (``merv pretrain --threads``: merv.runtime.reproducible)."""
    return train_encoder(cfg, Path(out))[1]


def train_encoder(cfg: PretrainConfig, out: Path) -> tuple[VisualEncoder, dict]:
    """The stage's work: the trained encoder (as the MERV wrapper) and its report, both written to ``out``."""
    enc_cfg = cfg.encoder_config(out)
    torch.manual_seed(cfg.seed)
    save_encoder(enc_cfg, init_encoder(enc_cfg))  # random init, then loaded through the real wrapper and trained
    encoder = build_encoder(enc_cfg)
    tubelet = tubelet_frames(encoder)
    classes = label_classes(cfg.task)
    head = PretextHead(encoder.embed_dim, classes, per_position=cfg.task == "motion")
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup_steps))

    grid = math.isqrt(encoder.tokens_per_frame)

    def batch(rng, n):
        return pretext_batch(cfg.task, rng, n, cfg.render_size, encoder.num_frames, tubelet, grid)

    held_out = batch(np.random.default_rng([cfg.seed, 1]), cfg.eval_samples)
    held_out_frames = prepare(encoder, held_out.frames)
    before = accuracy(encoder, head, held_out, held_out_frames)
    curve, measure_at = [{"step": 0, "accuracy": before}], curve_steps(cfg.steps, cfg.curve_points)
    rng = np.random.default_rng([cfg.seed, 0])
    losses, start = [], time.time()
    for step in range(cfg.steps):
        encoder.train()
        head.train()
        data = batch(rng, cfg.batch_size)
        loss = pretext_loss(head(encoder(prepare(encoder, data.frames))), data.labels, cfg.loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step + 1 in measure_at:  # eval mode and no RNG: the training run is the same with or without it
            curve.append({"step": step + 1, "accuracy": accuracy(encoder, head, held_out, held_out_frames)})
            log.info(
                "pretrain %s step %d/%d loss %.4f held-out %s", cfg.task, step + 1, cfg.steps,
                np.mean(losses[-10:]), {k: round(v, 3) for k, v in curve[-1]["accuracy"].items()},
            )  # fmt: skip
    after = curve[-1]["accuracy"]
    seconds = time.time() - start

    save_encoder(enc_cfg, encoder.model)
    max_diff = reload_difference(encoder, enc_cfg, held_out.frames[:4])
    window = max(1, min(10, cfg.steps // 5))
    report = {
        "config": dataclasses.asdict(cfg),
        "encoder": dataclasses.asdict(enc_cfg),
        "labels": classes,
        "chance": {k: 1.0 / (n - k.endswith("_map")) for k, n in classes.items() if not k.endswith("_mask")},
        "held_out_accuracy_before": before,
        "held_out_accuracy": after,
        "curve": curve,  # held-out accuracy over the steps
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
        "losses": [round(x, 5) for x in losses],
        "reload_max_abs_diff": max_diff,
        "runtime": runtime_record(),
        # no wall time here: the folder's bytes are a function of the config (its digest keys the feature caches;
        # a rerun that trains the same weights must not invalidate them). The log and Snakemake's benchmark file
        # (results/benchmarks/pretrain_encoder_<name>.tsv) have the time.
    }
    (out / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    (out / CURVE).write_bytes(curve_png(report, f"{cfg.encoder} ({cfg.task})"))
    log.info("pretrained %s (%s) in %.0fs: held-out accuracy %s", cfg.encoder, cfg.task, seconds, after)
    return encoder, report


@torch.no_grad()
def reload_difference(trained: VisualEncoder, enc_cfg: EncoderConfig, frames: np.ndarray) -> float:
    """Load the saved weights through the real loader; the largest feature difference from the trained module.

    Raises when they differ: a save/load path that silently drops or re-initialises weights must not pass."""
    trained.eval()
    reloaded = build_encoder(enc_cfg).eval()
    x = prepare(trained, frames)
    diff = float((trained(x) - reloaded(x)).abs().max())
    if not math.isfinite(diff) or diff > 1e-4:
        raise RuntimeError(f"encoder {enc_cfg.id!r} reloaded from {enc_cfg.weights} differs (max abs diff {diff})")
    return diff
