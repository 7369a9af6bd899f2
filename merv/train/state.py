"""Resumable training state: ``<out>.work/step-NNNNNNNN/`` folders written atomically during a stage.

Each holds the trainable model weights and the optimizer state (``torch.distributed.checkpoint``, one shard per rank),
a ``meta.json`` with the step, the data position, the LR scheduler, the metrics so far and the fingerprint of what is
being trained, and one ``rank-<r>.json`` per rank with that rank's own data position and RNG states. A run that finds
a folder with its own fingerprint continues from it and ends bitwise where an uninterrupted run ends (on CPU, same
threads); the data it skips is never decoded again.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from merv.data.loader import Position

PATTERN = "step-{:08d}"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters (encoders, an untouched LLM) come from the base weights, not from the training state
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def work_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".work")


def save_state(
    work: Path, step: int, model, optimizer, scheduler, position: Position, extra: dict, keep_last: int, d=None
) -> Path:
    """Write ``work/step-<step>`` (temp name, then rename) and keep only the newest ``keep_last`` folders.

    Collective under several processes: every rank writes its shard, rank 0 the metadata and the rename.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from merv.train.distributed import Dist, barrier

    d = d or Dist()
    final = work / PATTERN.format(step)
    tmp = work / (final.name + ".tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    own = {"rank": d.rank, "data_position": asdict(position), "rng": rng_state()}
    (tmp / f"rank-{d.rank}.json").write_text(json.dumps(own))
    barrier(d)
    if not d.is_main:
        barrier(d)
        return final
    meta = {"step": step, "data_position": asdict(position), "scheduler": scheduler.state_dict(), **extra}
    (tmp / "meta.json").write_text(json.dumps(meta, allow_nan=False))  # strict JSON: metrics are finite
    tmp.rename(final)
    for old in sorted(p for p in work.glob("step-*") if not p.name.endswith(".tmp"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def latest_state(work: Path, fingerprint: str) -> Path | None:
    """The newest complete state folder written for ``fingerprint``; stale or partial ones are ignored."""
    if not work.is_dir():
        return None
    for folder in sorted((p for p in work.glob("step-*") if not p.name.endswith(".tmp")), reverse=True):
        meta = folder / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
            return folder
    return None


def load_state(folder: Path, model, optimizer, scheduler, rank: int = 0) -> tuple[int, Position, dict]:
    """Restore weights, optimizer, scheduler, and this rank's RNG states and data position from ``folder``;
    returns ``(step, position, meta)``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder / "dcp"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options()
    )
    meta = json.loads((folder / "meta.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    own = json.loads((folder / f"rank-{rank}.json").read_text())
    set_rng_state(own["rng"])
    return meta["step"], Position(**own["data_position"]), meta
