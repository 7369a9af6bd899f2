"""Self-describing checkpoints: a folder with ``model.safetensors``, ``config.json`` and ``meta.json``.

Only the module groups that were ever trained are stored (frozen encoders and an untouched LLM come from the
weights the config names), so a stage-1 checkpoint of a 7B model holds megabytes, not gigabytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from merv.config import RunConfig, load_run_config
from merv.models.merv import MERV

WEIGHTS = "model.safetensors"


def state_of_groups(state: dict, groups: list[str], dtype=None) -> dict:
    """The tensors of ``state`` in the module ``groups``, floating ones cast to ``dtype`` when given."""
    out = {k: v.detach().contiguous() for k, v in state.items() if k.split(".")[0] in groups}
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in out.items()}


def save_checkpoint(
    model: MERV | None,
    run: RunConfig,
    out: Path,
    meta: dict,
    extra: dict[str, str | bytes] | None = None,
    full_state: dict | None = None,
) -> None:
    """Write atomically: into ``<out>.tmp`` then rename, so a crash never leaves a half checkpoint at ``out``.

    ``full_state`` is the gathered state dict of a sharded model, or the weights of an import (default:
    ``model.state_dict()``). Weights are stored in ``run.train.checkpoint_dtype``, which ``meta.json`` records
    (``precision.checkpoint``).
    """
    from safetensors.torch import save_file

    from merv.runtime import held_dtype

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = full_state if full_state is not None else model.state_dict()
    dtype = run.train.checkpoint_dtype
    save_file(state_of_groups(state, meta["trained_groups"], held_dtype(dtype)), str(tmp / WEIGHTS))
    meta = {**meta, "precision": {**meta.get("precision", {}), "checkpoint": dtype}}
    (tmp / "config.json").write_text(json.dumps(run.to_dict(), indent=1))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for name, content in (extra or {}).items():
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def read_meta(path: Path) -> dict:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{path}: not a merv checkpoint (no meta.json)")
    return json.loads(meta.read_text())


class CheckpointError(ValueError):
    """A checkpoint folder whose weights do not fit the model its config describes."""


def check_state(state: dict, expected: dict, groups: list[str], where: str) -> None:
    """Every tensor of the module ``groups`` in ``expected`` (a model's parameter names and shapes) is in ``state``
    with its shape, and ``state`` holds nothing else; otherwise a :class:`CheckpointError` naming ``where`` and the
    tensors."""
    wanted = {k: tuple(shape) for k, shape in expected.items() if k.split(".")[0] in groups}
    extra = sorted(set(state) - set(wanted))
    missing = sorted(set(wanted) - set(state))
    shapes = [
        f"{k} {list(state[k].shape)} (the model's: {list(wanted[k])})"
        for k in sorted(set(state) & set(wanted))
        if tuple(state[k].shape) != wanted[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of {groups} missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) the model lacks, e.g. {extra[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) of the wrong shape, e.g. {'; '.join(shapes[:3])}")
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit the configured model: {'; '.join(problems)}")


def load_checkpoint(
    path: str | Path, model: MERV | None = None, groups: list[str] | tuple[str, ...] | None = None, dtype=None
) -> tuple[MERV, RunConfig, dict]:
    """Load a checkpoint folder: build the model from its config (unless given; held in ``dtype``, default the
    config's ``model.dtype``) and apply the stored weights (cast to the dtype the model holds them in).

    Loading is strict: every tensor of the module groups the checkpoint trained (``meta["trained_groups"]``) must be
    stored with the model's shape, and nothing else, or a :class:`CheckpointError` names the file and the tensors.
    ``groups`` takes only those of the stored groups (a stage that starts from part of the previous one).

    Frozen weights the config names by relative paths are found from any working directory: under
    ``$MERV_WEIGHTS``, then in the project folder the checkpoint was trained in (see :mod:`merv.weights`).
    """
    from safetensors.torch import load_file

    from merv.models.fusion import upgrade_state
    from merv.weights import checkpoint_roots

    path = Path(path)
    meta = read_meta(path)
    run = load_run_config(path / "config.json")
    model = model or MERV.from_config(run.model, checkpoint_roots(path, meta), dtype=dtype)
    state = upgrade_state(load_file(str(path / WEIGHTS)))
    stored = list(meta["trained_groups"])
    check_state(state, {k: v.shape for k, v in model.state_dict().items()}, stored, str(path / WEIGHTS))
    if groups is not None:
        state = state_of_groups(state, [g for g in stored if g in groups])
    model.load_state_dict(state, strict=False)
    return model, run, meta
