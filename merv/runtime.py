"""Where and in which precision inference runs: the ``--device`` / ``--dtype`` options of ``merv eval``, ``merv
generate``, ``merv serve`` and ``load_vid``.

Default (``auto``): the first CUDA device in bfloat16 when one is present, else the CPU in float32.
"""

from __future__ import annotations

import torch

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``; otherwise the named device, checked to exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: not a device ({DEVICE_CHOICES})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: this machine has no CUDA device (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: unsupported device type {dev.type!r} ({DEVICE_CHOICES})")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> bfloat16 on CUDA, float32 on CPU; else ``bf16``, ``fp16`` or ``fp32``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"--dtype {dtype!r}: not one of {DTYPE_CHOICES}") from None


def held_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a config's ``fp32``/``bf16``/``fp16`` (``ModelConfig.dtype``, ``checkpoint_dtype``)."""
    return resolve_dtype(name, torch.device("cpu"))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def local_device(local_rank: int) -> str:
    """The device of the process with ``local_rank`` on its node, made current: ``cuda:<local rank>`` where each
    process sees all the node's GPUs, ``cuda:0`` where Slurm binds one GPU to each task; the CPU without GPUs."""
    if not torch.cuda.is_available():
        return "cpu"
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return f"cuda:{index}"
