"""Where frozen weights are found, from any working directory.

A config names each weight (an encoder's file or folder, the LLM's folder) by an absolute path or by a relative one.
A relative path is looked up, in this order, under:

1. each root in ``$MERV_WEIGHTS`` (``os.pathsep``-separated), e.g. ``MERV_WEIGHTS=/shared/merv`` holding
   ``weights/Llama-2-7b-hf`` for the presets' ``weights/Llama-2-7b-hf``;
2. the roots the caller knows: for a checkpoint, the project folder it was trained in, found relative to the
   checkpoint (so a copied project still works) and then as the absolute path recorded at training time (so a moved
   or copied results folder still works on the same machine); for a config file, its folder;
3. the current working directory.

The first root under which the path exists wins. When none has it, :class:`WeightsNotFound` names the weight and
every place that was tried.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from merv.config import ModelConfig

ENV = "MERV_WEIGHTS"


class WeightsNotFound(FileNotFoundError):
    """A weight file or folder a config names exists in none of the places it was looked for."""

    def __init__(self, what: str, path: str, tried: list[Path]):
        self.what, self.path, self.tried = what, path, tried
        places = "\n".join(f"  - {p}" for p in tried)
        super().__init__(
            f"{what}: {path!r} not found; looked in:\n{places}\n(set {ENV} to the folder that holds it, or use an "
            "absolute path)"
        )


def search_roots(roots: list[Path] | tuple[Path, ...] = ()) -> list[Path]:
    """``$MERV_WEIGHTS`` roots, then ``roots``, then the working directory (duplicates dropped, order kept)."""
    env = [Path(p) for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    out: list[Path] = []
    for root in [*env, *roots, Path.cwd()]:
        root = Path(os.path.abspath(root))
        if root not in out:
            out.append(root)
    return out


def resolve(path: str, what: str, roots: list[Path] | tuple[Path, ...] = ()) -> Path:
    """The absolute location of one weight (see the module docstring)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        if p.exists():
            return p
        raise WeightsNotFound(what, path, [p])
    tried = [root / p for root in search_roots(roots)]
    for candidate in tried:
        if candidate.exists():
            return candidate
    raise WeightsNotFound(what, path, tried)


def weight_paths(cfg: ModelConfig, roots: list[Path] | tuple[Path, ...] = ()) -> dict[str, Path]:
    """``{"encoder <id>": path, ..., "llm": path}``: where each weight of ``cfg`` is found (nothing else is read)."""
    paths = {f"encoder {e.id}": resolve(e.weights, f"encoder {e.id!r} weights", roots) for e in cfg.encoders}
    return paths | {"llm": resolve(cfg.llm.weights, "LLM weights", roots)}


def resolve_model(cfg: ModelConfig, roots: list[Path] | tuple[Path, ...] = ()) -> ModelConfig:
    """A copy of ``cfg`` whose encoder and LLM weights are absolute paths that exist, and whose encoders' frame
    preprocessing is explicit (see :func:`merv.data.transforms.with_preprocessing`)."""
    from merv.data.transforms import with_preprocessing

    encoders = tuple(
        with_preprocessing(dataclasses.replace(e, weights=str(resolve(e.weights, f"encoder {e.id!r} weights", roots))))
        for e in cfg.encoders
    )
    llm = dataclasses.replace(cfg.llm, weights=str(resolve(cfg.llm.weights, "LLM weights", roots)))
    return dataclasses.replace(cfg, encoders=encoders, llm=llm)


def checkpoint_roots(checkpoint: Path, meta: dict) -> list[Path]:
    """The project folder a checkpoint was trained in: relative to the checkpoint, then its recorded absolute path."""
    project = meta.get("project") or {}
    roots = []
    if project.get("relative"):
        roots.append(Path(checkpoint) / project["relative"])
    if project.get("absolute"):
        roots.append(Path(project["absolute"]))
    return roots


def project_record(checkpoint: Path) -> dict:
    """What a checkpoint records about the folder it is trained in (the working directory), for
    :func:`checkpoint_roots`."""
    cwd = Path.cwd().resolve()
    return {"absolute": str(cwd), "relative": os.path.relpath(cwd, Path(checkpoint).resolve())}
