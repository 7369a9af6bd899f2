"""Self-describing checkpoints: a folder with ``model.safetensors``, ``config.json`` and ``meta.json``.

Only the module groups that were ever trained are stored (frozen encoders and an untouched LLM come from the
weights the config names), so a stage-1 checkpoint of a 7B model holds megabytes, not gigabytes.

``meta.json`` also records the config the weights were trained with (``trained_config``): loading refuses a
``config.json`` edited since (see :func:`merv.integrity.check_checkpoint_config`), and a weights file that does not
hold exactly the trained groups' tensors, shaped and typed as the model's and finite (:mod:`merv.integrity`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from merv.config import RunConfig, load_run_config
from merv.models.merv import MERV

log = logging.getLogger(__name__)
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
    (tmp / "meta.json").write_text(json.dumps({**meta, "trained_config": run.to_dict()}, indent=1))
    for name, content in (extra or {}).items():
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def read_meta(path: Path) -> dict:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{path}: not a merv checkpoint (no meta.json)")
    return json.loads(meta.read_text())


def check_state(state: dict, expected: dict, groups: list[str], where: str) -> None:
    """Every tensor of the module ``groups`` in ``expected`` (a model's ``{name: (shape, dtype)}``) is in ``state``
    (a state dict in memory, e.g. an import's) with its shape and a compatible dtype, and ``state`` holds nothing
    else; otherwise an :class:`~merv.integrity.IntegrityError` naming ``where`` and the tensors."""
    from merv.integrity import check_tensors, safetensors_dtype

    wanted = {k: v for k, v in expected.items() if k.split(".")[0] in groups}
    found = {k: (tuple(v.shape), safetensors_dtype(v.dtype)) for k, v in state.items()}
    check_tensors(where, found, wanted)


def load_checkpoint(
    path: str | Path, model: MERV | None = None, groups: list[str] | tuple[str, ...] | None = None, dtype=None
) -> tuple[MERV, RunConfig, dict]:
    """Load a checkpoint folder: build the model from its config (unless given; held in ``dtype``, default the
    config's ``model.dtype``) and apply the stored weights (cast to the dtype the model holds them in).

    Loading is strict: every tensor of the module groups the checkpoint trained (``meta["trained_groups"]``) must be
    stored with the model's shape, a floating dtype and finite values, and nothing else, or an
    :class:`~merv.integrity.IntegrityError` names the file and the tensors (see the module docstring). ``groups``
    takes only those of the stored groups (a stage that starts from part of the previous one).

    Frozen weights the config names by relative paths are found from any working directory: under
    ``$MERV_WEIGHTS``, then in the project folder the checkpoint was trained in (see :mod:`merv.weights`).
    """
    from merv.integrity import check_checkpoint_config, expected_of, load_verified
    from merv.weights import checkpoint_roots

    path = Path(path)
    meta = read_meta(path)
    run = load_run_config(path / "config.json")
    if not check_checkpoint_config(path, json.loads((path / "config.json").read_text()), meta):
        log.warning("%s records no training config (an older checkpoint): config.json is used as it is", path)
    model = model or MERV.from_config(run.model, checkpoint_roots(path, meta), dtype=dtype)
    stored = meta.get("trained_groups") or []
    expected = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in stored}
    state = load_verified(path / WEIGHTS, expected_of(expected))
    if groups is not None:
        state = state_of_groups(state, [g for g in stored if g in groups])
    model.load_state_dict(state, strict=False)  # the frozen groups come from their own weights
    return model, run, meta
