"""Process group and FSDP2 wrapping. One process needs none of it; ``torchrun`` (or submitit, see
:mod:`merv.train.launch`) sets the environment for N processes.

Which backend serves which tensor: on GPUs the group has one backend per device type, ``cpu:gloo,cuda:nccl``. FSDP2's
collectives move CUDA tensors (NCCL); merv's own are host values: the step's token and sample counts, the loss, the
stop flag, barriers, and the object collectives of ``torch.distributed.checkpoint`` (gloo). A group of NCCL alone
refuses every CPU tensor (``No backend type associated with device type cpu``) at the first step. On CPUs: gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from merv.runtime import local_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def backend_for(device: str | torch.device) -> str:
    """The process-group backend for a process computing on ``device``: gloo for CPU tensors always, and NCCL for
    CUDA tensors on GPUs (see the module's docstring)."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed() -> Dist:
    """Join the process group that ``torchrun``'s environment describes (no-op for a single process); a group made
    before (by :mod:`merv.train.launch`) is kept."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device="cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = local_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return Dist(dist.get_rank(), world, local, device)


def ensure_process_group(d: Dist) -> None:
    """FSDP2 needs a process group, also for one process (its mixed-precision policy on a single GPU): a group of one
    in memory when ``torchrun`` made none."""
    if not dist.is_initialized():
        dist.init_process_group(backend_for(d.device), store=dist.HashStore(), rank=0, world_size=1)


def all_reduce_sum(value: float | int, d: Dist) -> float:
    """Sum one host value over the ranks."""
    return all_reduce_sums([value], d)[0]


def all_reduce_sums(values: list[float | int], d: Dist) -> list[float]:
    """Sum each host value over the ranks, in one collective (a CPU tensor: gloo's part of the group)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    """Wait for every rank (on gloo's part of the group: torch picks the CPU where the group serves it)."""
    if d.enabled:
        dist.barrier()


def shard_model(model, mode: str, bf16: bool) -> None:
    """``fully_shard`` each FSDP unit the model names (encoders, LLM blocks, projectors, ...), then the model root.

    ``full_shard`` reshards parameters after forward (least memory); ``shard_grad_op`` keeps them gathered until
    backward (less communication). Frozen parameters are sharded too, and get no gradients.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"reshard_after_forward": mode == "full_shard"}
    if policy is not None:
        kwargs["mp_policy"] = policy
    for unit in model.fsdp_units():
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
