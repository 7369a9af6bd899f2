"""Training metrics: throughput and model FLOPs utilisation, Weights & Biases (offline unless configured), and a
loss-curve PNG per run."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def model_flops(model, llm_tokens: int, samples: int) -> float:
    """6 x trainable LLM params x LLM tokens (forward + backward) + 2 x encoder params x encoder tokens (frozen)."""
    llm = 6 * sum(p.numel() for p in model.llm.parameters()) * llm_tokens
    enc = sum(
        2
        * sum(p.numel() for p in e.parameters())
        * samples
        * e.temporal_positions
        * (e.tokens_per_frame + e.prefix_tokens)
        for e in model.encoders.values()
    )
    return llm + enc


class WandbLogger:
    """Logs each step to Weights & Biases: offline into ``<dir>/wandb`` unless ``WANDB_MODE`` says otherwise
    (``WANDB_MODE=disabled`` turns it off)."""

    def __init__(self, directory: Path, name: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "merv"),
            name=name,
            dir=str(directory),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
            reinit="finish_previous",
        )

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=record["step"])
        except Exception as e:  # a metrics service must never stop training (e.g. its process got a signal)
            log.warning("wandb logging failed, continuing without it: %s", e)
            self.run = None

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                log.warning("wandb finish failed: %s", e)


def loss_curve_png(metrics: list[dict], title: str) -> bytes:
    """The loss and learning-rate curves of a run as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [m["loss"] for m in metrics], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per target token)")
    ax.set_title(title)
    lr = ax.twinx()
    lr.plot(steps, [m["lr"] for m in metrics], color="tab:orange", alpha=0.6, label="lr")
    lr.set_ylabel("learning rate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
