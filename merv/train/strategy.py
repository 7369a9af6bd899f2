"""How a stage runs on this hardware, decided once: device, precision, FSDP2 wrapping, kernels, optimizer, clipping.

- ``mixed_precision: bf16``: on GPUs, FSDP2's mixed-precision policy on any number of GPUs (a one-process group on
  a single GPU): parameters are cast to bf16 once per step for compute, the fp32 master weights stay sharded, and
  gradients are reduced in fp32; no autocast copy of every weight at every use. On a CPU process, autocast.
- Several processes: FSDP2 (``fully_shard``) unit by unit as the model lists them, full-shard or shard-grad-op.
- Gradient accumulation: gradients are reduced only after the last micro-step of a step.
- ``kernels: liger``: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE, and its fused linear cross-entropy (no
  ``[tokens, vocab]`` fp32 logits), on GPUs (``pip install '.[gpu]'``); ``compile: true``: each LLM block is
  compiled with ``torch.compile``. The plain PyTorch path stays the reference the tests compare against.
- AdamW: fused on GPUs, foreach otherwise; no weight decay on biases and norms.
"""

from __future__ import annotations

import logging

import torch

from merv.config import StageConfig
from merv.train.distributed import Dist, ensure_process_group, shard_model

log = logging.getLogger(__name__)


class Strategy:
    def __init__(self, stage: StageConfig, d: Dist, fsdp: bool | None = None):
        """``fsdp``: None decides from the hardware; True shards even one CPU process, as one GPU would be (tests,
        ``benchmarks/gpu_check.py --dry-run``)."""
        self.stage, self.d = stage, d
        self.cuda = str(d.device).startswith("cuda")
        self.bf16 = stage.mixed_precision == "bf16"
        # FSDP2's mixed precision also on a single GPU
        self.fsdp = (d.enabled or (self.bf16 and self.cuda)) if fsdp is None else fsdp
        if stage.kernels == "liger" and not self.cuda:
            raise ValueError(f"stage {stage.name!r}: kernels 'liger' needs a CUDA device (Triton kernels)")

    def describe(self) -> dict:
        return {
            "device": str(self.d.device),
            "compute": ("bf16 params (FSDP2 policy)" if self.fsdp else "bf16 autocast") if self.bf16 else "fp32",
            "fsdp": self.stage.fsdp if self.fsdp else None,
            "kernels": self.stage.kernels,
            "compile": self.stage.compile,
            "loss_logits": self.stage.loss_logits,
        }

    def prepare(self, model):
        """Move, checkpoint, patch kernels into, compile and shard ``model`` for this stage (in that order)."""
        model.to(self.d.device)
        model.loss_logits = "liger" if self.stage.kernels == "liger" else self.stage.loss_logits
        if self.stage.activation_checkpointing and "llm" in self.stage.trainable:
            model.llm.gradient_checkpointing_enable()
        if self.stage.kernels == "liger":
            apply_liger_kernels(model.llm)
        if self.stage.compile:
            for block in model.llm_blocks():
                block.compile()
        if self.fsdp:
            ensure_process_group(self.d)
            shard_model(model, self.stage.fsdp, self.bf16)
        return model

    def autocast(self):
        enabled = self.bf16 and not self.fsdp
        return torch.autocast("cuda" if self.cuda else "cpu", torch.bfloat16, enabled=enabled)

    def optimizer(self, model) -> torch.optim.Optimizer:
        return make_optimizer(model, self.stage, fused=self.cuda)

    def micro_step(self, model, batch: dict, scale: float, last: bool):
        """Forward and backward of one micro-batch (its summed loss times ``scale``); gradients are reduced across
        ranks only on the ``last`` micro-step of a step. Returns the detached summed loss and the fusion weights."""
        if self.fsdp and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        with self.autocast():
            loss_sum, _, weights = model(
                batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"], batch["has_video"],
                batch["features"],
            )  # fmt: skip
        (loss_sum * scale).backward()
        return loss_sum.detach(), weights

    def clip(self, params, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def make_optimizer(model, stage: StageConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D parameters); fused
    kernels on GPUs."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": stage.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.999), **({"fused": True} if fused else {}))


def apply_liger_kernels(llm) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels in the LLM's modules (its fused cross-entropy is used by the loss)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ValueError("kernels 'liger' needs the liger-kernel package: pip install '.[gpu]'") from e
    model_type = llm.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"kernels 'liger': Liger has no kernels for LLMs of type {model_type!r}")
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=llm
    )
