"""Launching a training stage through submitit: N local processes, or a Slurm job of nodes x tasks (x GPUs).

The submitted callable sets up ``torch.distributed`` from submitit's job environment and trains. When Slurm preempts
the job or its time runs out, it signals the job (USR2): every rank finishes its step, the training state is saved,
and submitit calls :meth:`TrainJob.checkpoint`, which requeues the same job; the requeued job finds that state
(``<out>.work/step-*``) and continues from it, without a person.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)


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
        import submitit

        from merv.config import run_config_from_dict
        from merv.train.loop import Preempted, train_stage

        env = submitit.JobEnvironment()
        os.environ.update(
            RANK=str(env.global_rank),
            LOCAL_RANK=str(env.local_rank),
            WORLD_SIZE=str(env.num_tasks),
            MASTER_ADDR=env.hostnames[0],
            MASTER_PORT=str(20000 + int(str(env.job_id).split("_")[0]) % 20000),
        )
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
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


def submit(job: TrainJob, cfg: LaunchConfig, wait: bool = True):
    """Submit ``job``; with ``wait``, block until it (and any requeued continuation) ends, and return its result."""
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
    results = submitted.results()
    return job.finish(results) if hasattr(job, "finish") else results[0]
