"""Process group and FSDP2 wrapping. One process needs none of it; ``torchrun`` (or submitit) sets the environment
for N processes: gloo on CPU, NCCL on GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_distributed() -> Dist:
    """Join the process group that ``torchrun``'s environment describes (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device="cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        backend, device = "nccl", f"cuda:{local}"
    else:
        backend, device = "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), world, local, device)


def ensure_process_group(d: Dist) -> None:
    """FSDP2 needs a process group, also for one process (its mixed-precision policy on a single GPU): a group of one
    in memory when ``torchrun`` made none."""
    if not dist.is_initialized():
        backend = "nccl" if str(d.device).startswith("cuda") else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def all_reduce_sum(value: float | int, d: Dist) -> float:
    return all_reduce_sums([value], d)[0]


def all_reduce_sums(values: list[float | int], d: Dist) -> list[float]:
    """Sum each value over the ranks, in one collective."""
    if not d.enabled:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
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
