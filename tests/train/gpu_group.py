"""Run under ``torchrun``: a stage trained in the process group merv makes on a GPU node, on CPUs.

NCCL cannot run here, so it is replaced by a stand-in that, like NCCL, serves CUDA tensors only (gloo underneath,
registered for the device type ``cuda``). The group is made by merv's own ``init_distributed`` while this process
believes it has a GPU; then the GPU is taken away again and the stage trains on the CPU in that group: every
collective on a host tensor (the step's counts, the loss, the stop flag, barriers, the checkpoint's object
collectives, FSDP2's on these CPU parameters) must find a backend for the CPU in it. A group of NCCL alone finds none
(``No backend type associated with device type cpu``), which is what every multi-GPU run met at its first step.

    python -m torch.distributed.run --nproc-per-node 2 tests/train/gpu_group.py CONFIG.json DATA OUT
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

STAND_IN = "stand_in_nccl"


def stand_in_backend(store, rank, world_size, timeout):
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def init_as_on_a_gpu_node():
    """merv's ``init_distributed`` on a node that seems to have one GPU per process; NCCL -> the stand-in."""
    from merv.train.distributed import init_distributed

    dist.Backend.register_backend(STAND_IN, stand_in_backend, devices=["cuda"])
    real_init = dist.init_process_group

    def init(backend=None, *args, **kwargs):
        return real_init(backend.replace("nccl", STAND_IN), *args, **kwargs)

    with (
        mock.patch.object(dist, "init_process_group", init),
        mock.patch.object(torch.cuda, "is_available", lambda: True),
        mock.patch.object(torch.cuda, "device_count", lambda: 1),
        mock.patch.object(torch.cuda, "set_device", lambda index: None),
    ):
        d = init_distributed()
    assert str(d.device).startswith("cuda"), d
    return d


def main() -> None:
    from merv.config import load_run_config
    from merv.train.loop import Preempted, train_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config, data, out = sys.argv[1:4]
    d = init_as_on_a_gpu_node()
    devices = sorted(t.type for t in dist.group.WORLD._device_types)
    print(f"rank {d.rank}: process group serves {devices}", flush=True)
    run = load_run_config(config)
    stage = run.train.stages[-1].name
    try:  # rank 1 asks to stop: every rank agrees, saves the state of step 1 (DCP) and stops
        train_stage(run, stage, Path(data), Path(out), progress=False, stop=lambda: d.rank == 1)
        raise AssertionError("the stop flag was not agreed on")
    except Preempted as e:
        assert e.step == 1, e.step
    meta = train_stage(run, stage, Path(data), Path(out), progress=False)  # resumes from that state (DCP load)
    print(f"rank {d.rank}: " + json.dumps({k: meta[k] for k in ("step", "processes", "samples_seen")}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
