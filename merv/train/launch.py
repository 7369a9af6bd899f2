"""Launching a training stage through submitit: N local processes, or a Slurm job of nodes x tasks (x GPUs).

The submitted callable takes its place in the job from submitit's ``TorchDistributedEnvironment`` (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), joins the process group on a
rendezvous whose port rank 0 bound itself (:func:`rendezvous`), and trains. When Slurm preempts the job or its time
runs out, it signals the job (USR2): every rank finishes its step, the training state is saved, and submitit calls
:meth:`TrainJob.checkpoint`, which requeues the same job; the requeued job finds that state (``<out>.work/step-*``)
and continues from it, without a person.

A submission made from inside a Slurm job (a Snakemake job on the cluster) happens in a clean environment: that
job's ``SLURM_*`` variables (its memory, CPUs, GPUs, job id) would otherwise reach the new job, whose ``srun`` then
refuses to start (``SLURM_MEM_PER_CPU, SLURM_MEM_PER_GPU, and SLURM_MEM_PER_NODE are mutually exclusive``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

TORCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_TIMEOUT = timedelta(minutes=30)  # how long ranks wait for each other (and for rank 0's address)


class JobFailed(RuntimeError):
    """A submitted job ended with an error: the error's last line and where its logs are."""


@dataclass(frozen=True)
class LaunchConfig:
    launcher: Literal["local", "slurm"]
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    partition: str | None = None
    account: str | None = None
    time_min: int = 60
    folder: str = "results/submitit"

    def __post_init__(self):
        if self.launcher not in ("local", "slurm"):
            raise ValueError(f"launcher must be 'local' or 'slurm', got {self.launcher!r}")
        if self.nodes < 1 or self.tasks_per_node < 1:
            raise ValueError("nodes and tasks_per_node must be >= 1")
        if self.launcher == "local" and self.nodes != 1:
            raise ValueError("the local launcher runs on this machine: nodes must be 1")


class TrainJob:
    """A picklable stage-training call for submitit (one per task)."""

    def __init__(self, run: dict, stage: str, data: str, out: str, init: str | None, features: dict | None = None):
        self.run, self.stage, self.data, self.out, self.init = run, stage, data, out, init
        self.features = dict(features or {})

    def __call__(self) -> dict:
        from merv.config import run_config_from_dict
        from merv.train.loop import Preempted, train_stage

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        join_job()
        run = run_config_from_dict(self.run)
        init = Path(self.init) if self.init else None
        # Slurm signals a job (USR2) before preempting it or at its time limit. Instead of letting submitit requeue at
        # once, finish the current step and save a training state first, then hand over to submitit's handler.
        stop = threading.Event()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, lambda signum, frame: stop.set())
        try:
            features = {k: Path(v) for k, v in self.features.items()}
            data, out = Path(self.data), Path(self.out)
            return train_stage(run, self.stage, data, out, init, progress=False, stop=stop.is_set, features=features)
        except Preempted as e:
            log.warning("preempted or out of time: state saved at step %d, requeueing", e.step)
            if callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # rank 0: checkpoint() + requeue + exit
            while True:  # other ranks: Slurm ends them when it requeues the job
                time.sleep(60)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption or timeout: requeue; the new job resumes from the last saved state."""
        import submitit

        log.info("training job interrupted: requeueing; it will resume from the last state in %s.work", self.out)
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.run, self.stage, self.data, self.out, self.init, self.features)
        )


def join_job() -> None:
    """This task's place in the submitted job: the variables torch and merv read, exported from submitit's
    ``TorchDistributedEnvironment``, and with several tasks the process group, made on :func:`rendezvous`.

    ``CUDA_VISIBLE_DEVICES`` is left as Slurm set it (the job's own GPUs, which on a shared node need not be 0..n-1):
    each task takes ``LOCAL_RANK`` modulo the GPUs it sees (:func:`merv.train.distributed.local_device`).
    """
    import submitit
    import torch.distributed as dist

    from merv.runtime import local_device
    from merv.train.distributed import backend_for

    env = submitit.helpers.TorchDistributedEnvironment()
    job = submitit.JobEnvironment()
    store = None
    if env.world_size > 1:
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")  # a requeued job is a new rendezvous in the same folder
        where = Path(job.paths.folder) / f"rendezvous-{job.job_id}-{attempt}.json"
        store = rendezvous(where, env.rank, env.world_size, env.master_addr)
        env.master_port = store.port
    env.export(set_cuda_visible_devices=False, overwrite=True)
    device = local_device(env.local_rank)
    exported = " ".join(f"{k}={os.environ[k]}" for k in TORCH_VARIABLES)
    log.info("job %s on %s (%s): %s", job.job_id, job.hostname, device, exported)
    if store is not None and not dist.is_initialized():
        dist.init_process_group(
            backend_for(device), store=store, rank=env.rank, world_size=env.world_size, timeout=RENDEZVOUS_TIMEOUT
        )


def rendezvous(where: Path, rank: int, world_size: int, host: str, timeout: timedelta = RENDEZVOUS_TIMEOUT):
    """The job's ``TCPStore``: rank 0 serves it on a port it binds itself (port 0: the OS gives one that no live
    process on the node holds, so two live jobs never collide, unlike a port derived from the job id or a fixed
    one, and no other process can take it between choosing and binding) and publishes ``host:port`` in ``where``
    (the job's submitit folder, which every node sees); the other ranks read it and connect."""
    import torch.distributed as dist

    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        tmp = where.with_name(where.name + ".tmp")
        tmp.write_text(json.dumps({"host": host, "port": store.port}))
        tmp.replace(where)  # atomic: a rank never reads half an address
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not where.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 published no rendezvous address in {where} within {timeout}")
        time.sleep(0.2)
    address = json.loads(where.read_text())
    return dist.TCPStore(address["host"], address["port"], world_size, is_master=False, timeout=timeout)


def submit(job: TrainJob, cfg: LaunchConfig, wait: bool = True):
    """Submit ``job``; with ``wait``, block until it (and any requeued continuation) ends, and return its result.

    Submitted in a clean environment (submitit's ``clean_env``: no ``SLURM_*``, ``SUBMITIT_*`` or torch rendezvous
    variables of a job this runs in) but for ``SLURM_CONF``, which says where the cluster's configuration is.
    """
    import submitit

    executor = submitit.AutoExecutor(folder=Path(cfg.folder) / "%j", cluster=cfg.launcher)
    params = {
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.tasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "timeout_min": cfg.time_min,
        "name": f"merv-{job.stage}",
    }
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.launcher == "slurm":
        params["slurm_signal_delay_s"] = 60
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
        if cfg.account:
            params["slurm_account"] = cfg.account
    executor.update_parameters(**params)
    slurm_conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if slurm_conf:
            os.environ["SLURM_CONF"] = slurm_conf
        submitted = executor.submit(job)
    log.info(
        "submitted %s job %s (%d x %d tasks); logs in %s",
        cfg.launcher,
        submitted.job_id,
        cfg.nodes,
        cfg.tasks_per_node,
        cfg.folder,
    )
    if not wait:
        return submitted
    try:
        results = submitted.results()
    except submitit.core.utils.FailedJobError as e:
        raise JobFailed(
            f"{cfg.launcher} job {submitted.job_id} failed: {job_error(str(e))} (logs: {cfg.folder})"
        ) from e
    return job.finish(results) if hasattr(job, "finish") else results[0]


def job_error(report: str) -> str:
    """The exception a failed job raised (type and message), from submitit's report of its traceback."""
    lines = report.strip().splitlines()
    ends = [i for i, line in enumerate(lines) if line.startswith("----")]
    trace = lines[ends[0] + 1 : ends[1]] if len(ends) >= 2 else lines
    last_frame = max((i for i, line in enumerate(trace) if line.startswith("  File ")), default=-1)
    error = [line for line in trace[last_frame + 1 :] if line.strip() and not line.startswith(" ")]
    return " ".join(error) or lines[-1]
