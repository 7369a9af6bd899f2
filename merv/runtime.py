"""How numerics run: where and in which precision inference runs (the ``--device`` / ``--dtype`` options of ``merv
eval``, ``merv generate``, ``merv serve`` and ``load_vid``), and what every computing command pins so that its CPU
float results are the same bytes on every run (:func:`reproducible`, from config ``compute``).

Default device (``auto``): the first CUDA device in bfloat16 when one is present, else the CPU in float32.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from merv.settings import DEVICE_CHOICES, DTYPE_CHOICES

log = logging.getLogger(__name__)

# Environment that pins a CPU code path, per ``compute.isa``. Read once when the libraries start (MKL at its first
# call, ATen at its first dispatch, oneDNN at its first primitive): set before torch runs anything, as the CLI does.
# MKL's conditional numerical reproducibility (CBWR): AUTO,STRICT keeps this CPU's path and makes results independent
# of how arrays happen to be aligned in memory; AVX2 pins the AVX2 path (measured: "AVX2,STRICT" with MKL 2024.2
# in torch 2.14.1 silently keeps the AVX-512 path, so STRICT is left out there).
ISA_ENV = {
    "native": {"MKL_CBWR": "AUTO,STRICT"},
    "avx2": {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# torch.use_deterministic_algorithms needs this for cuBLAS on CUDA (set before the first cuBLAS call)
CUBLAS_WORKSPACE = ":4096:8"


def reproducible(threads: int, isa: str = "native") -> dict:
    """Pin what makes float results differ between runs of the same job, and return what was set.

    - ``threads`` compute threads (torch's intra-op pool, which also sets MKL's): a float sum split over a
      different number of threads is another sum. Exported as ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for the
      processes this one starts (torchrun, submitit), overriding what a scheduler put there (Snakemake sets them
      to the cores it grants a job);
    - the CPU code path of MKL, ATen and oneDNN (:data:`ISA_ENV`), MKL in its strict reproducible mode;
    - deterministic algorithms (``torch.use_deterministic_algorithms``; on CUDA only warnings where an op has no
      deterministic kernel, and cuBLAS's fixed workspace), oneDNN's and cuDNN's deterministic modes.

    The environment half takes effect only before torch has computed anything: call this first thing in a
    process (the ``merv`` CLI does, for every command that computes). Returns the applied settings, with the CPU
    capability torch runs with (a warning when the pinned one did not take: torch had already started).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if isa not in ISA_ENV:
        raise ValueError(f"compute isa must be one of {sorted(ISA_ENV)}, got {isa!r}")
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **ISA_ENV[isa]}
    os.environ.update(env)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    torch.backends.mkldnn.deterministic = True
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    capability = torch.backends.cpu.get_cpu_capability()
    if isa == "avx2" and capability != "AVX2":
        log.warning(
            "compute.isa avx2 asked for, but torch runs %s code (it started before the pin was set): results may "
            "differ from an AVX2 run",
            capability,
        )
    return {"threads": threads, "isa": isa, "cpu_capability": capability, "env": env}


def runtime_record() -> dict:
    """What a result's float bytes depend on besides its inputs: threads, CPU code path, library versions."""
    return {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


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
