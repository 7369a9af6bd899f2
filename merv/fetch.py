"""How a model's weights get where :mod:`merv.weights` finds them: fetched from their sources, or built locally.

Every encoder and the LLM name a ``weights`` path (a timm safetensors file or a transformers folder) and, for the
paper's presets, a ``source``: ``hf:<repo id>`` (a Hugging Face hub repository, downloaded as is) or
``timm:<model name>`` (timm's pretrained weights, saved as a local safetensors file). A relative path is looked for
under ``$MERV_WEIGHTS`` first, then the working directory (the project root in the pipeline), and fetched into the
first of them. Without a network (or with ``HF_HUB_OFFLINE=1``) :func:`fetch_weights` downloads nothing and fails
with every missing weight, where it was looked for and where it would come from.

Models without real weights (``merv-tiny``, the miniature of the paper's DAG) get toy weights built from their
config instead: :func:`build_local_weights`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from merv.config import RunConfig

log = logging.getLogger(__name__)

BuildKind = Literal["tiny", "standin"]


@dataclass(frozen=True)
class WeightPart:
    """One weight a model needs: an encoder's or the LLM's."""

    name: str  # "encoder <id>" or "llm"
    path: str  # as configured (relative paths are searched, see search_roots)
    source: str | None
    is_file: bool  # timm weights are one safetensors file; transformers weights a folder
    model_kwargs: dict  # timm create_model arguments of the encoder (image size ...)


SOURCE_RECORD = ".source.json"  # beside each fetched weight: <path>.source.json


def source_record_path(path: Path) -> Path:
    """Where `merv fetch-weights` records a weight's source, revision and file digests: beside it."""
    return Path(str(path) + SOURCE_RECORD)


def read_source_record(path: Path) -> dict | None:
    """The record `merv fetch-weights` wrote beside ``path`` (None for weights it did not fetch)."""
    import json

    record = source_record_path(path)
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{record}: unreadable fetch record ({e})") from None
    return data if isinstance(data, dict) else None


class MissingWeightsError(FileNotFoundError):
    """Some weights are neither present nor fetchable; the message lists each with its reason."""


def weight_parts(run: RunConfig) -> list[WeightPart]:
    """The weights ``run``'s model loads, encoders first."""
    parts = [
        WeightPart(f"encoder {e.id}", e.weights, e.source, e.kind == "timm_image", dict(e.model_kwargs))
        for e in run.model.encoders
    ]
    return parts + [WeightPart("llm", run.model.llm.weights, run.model.llm.source, False, {})]


def search_roots(root: str | Path | None = None) -> list[Path]:
    """Folders a relative weight path is looked for in: ``root`` if given, else those of
    :func:`merv.weights.search_roots` (``$MERV_WEIGHTS``, then the working directory)."""
    from merv.weights import search_roots as lookup_roots

    return [Path(root)] if root is not None else lookup_roots()


def is_present(path: Path, is_file: bool) -> bool:
    """A timm file exists; a transformers (or LanguageBind) folder has its ``config.json``."""
    return path.is_file() if is_file else (path / "config.json").is_file()


def candidates(part: WeightPart, roots: list[Path]) -> list[Path]:
    """Where ``part`` may be: its path itself when absolute, else under each root."""
    path = Path(part.path)
    return [path] if path.is_absolute() else [root / path for root in roots]


def hub_offline() -> bool:
    """True when the environment forbids hub downloads (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def fetch_weights(run: RunConfig, root: str | Path | None = None) -> list[dict]:
    """Make every weight of ``run`` present, downloading the missing ones from their sources.

    Returns one record per weight (name, path found or written, source, whether it was downloaded). Raises
    :class:`MissingWeightsError` naming every weight that is still missing, after trying all of them.
    """
    roots = search_roots(root)
    records, missing = [], []
    for part in weight_parts(run):
        places = candidates(part, roots)
        found = next((p for p in places if is_present(p, part.is_file)), None)
        if found is not None:
            records.append({"name": part.name, "path": str(found), "source": part.source, "downloaded": False})
            continue
        reason = _why_not_fetchable(part)
        if reason is None:
            try:
                _download(part, places[0])
                records.append({"name": part.name, "path": str(places[0]), "source": part.source, "downloaded": True})
                continue
            except Exception as e:  # any hub/network/timm failure: report it with the others
                reason = f"download failed: {type(e).__name__}: {e}".splitlines()[0]
        looked = ", ".join(map(str, places))
        missing.append(f"{part.name}: {part.path} (looked in {looked}; source {part.source}): {reason}")
    if missing:
        raise MissingWeightsError(
            f"{len(missing)} of {len(records) + len(missing)} weights of {run.model.name} are missing:\n  "
            + "\n  ".join(missing)
        )
    return records


def _why_not_fetchable(part: WeightPart) -> str | None:
    if part.source is None:
        return "no source is configured; place the weights there yourself or set a source"
    if hub_offline():
        return "offline (HF_HUB_OFFLINE is set), not downloaded"
    return None


def _download(part: WeightPart, target: Path) -> None:
    """Fetch ``part`` into ``target`` through a temporary sibling, renamed at the end: never a half-written weight."""
    scheme, name = part.source.split(":", 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.unlink(missing_ok=True)
    log.info("fetching %s from %s into %s", part.name, part.source, target)
    if scheme == "timm":
        _download_timm(name, part.model_kwargs, tmp)
    else:
        _download_hub(name, tmp)
    if target.is_dir():  # an incomplete folder (no config.json) left by someone else
        shutil.rmtree(target)
    os.replace(tmp, target)


def _download_hub(repo_id: str, folder: Path) -> None:
    """A hub repository as files; PyTorch/TF/Flax pickles are skipped when safetensors weights exist."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    ignore = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx"] if has_safetensors else ["*.h5"]
    snapshot_download(repo_id, local_dir=folder, ignore_patterns=ignore + [".gitattributes"])
    shutil.rmtree(folder / ".cache", ignore_errors=True)  # huggingface_hub's resume records: the folder is complete


def _download_timm(model_name: str, model_kwargs: dict, file: Path) -> None:
    """timm's pretrained weights (through its own hub loader), saved as the state dict merv loads back."""
    import timm

    from merv.models.tiny import save_module

    model = timm.create_model(model_name, pretrained=True, num_classes=0, **model_kwargs)
    save_module(model, file)


# ------------------------------------------------------------------------------------------------------------------
# Locally built weights


def with_local_weights(run: RunConfig, folder: str | Path) -> RunConfig:
    """``run`` with every weight path inside ``folder``: ``<id>/model.safetensors`` for timm encoders, ``<id>/``
    for folder encoders, ``llm/`` for the LLM (the layout :mod:`merv.models.standins` writes)."""
    folder = Path(folder)
    encoders = tuple(
        dataclasses.replace(
            e, weights=str(folder / e.id / "model.safetensors") if e.kind == "timm_image" else str(folder / e.id)
        )
        for e in run.model.encoders
    )
    llm = dataclasses.replace(run.model.llm, weights=str(folder / "llm"))
    return dataclasses.replace(run, model=dataclasses.replace(run.model, encoders=encoders, llm=llm))


def build_local_weights(
    run: RunConfig, kind: BuildKind, seed: int = 0, skip_encoders: tuple[str, ...] = ()
) -> list[Path]:
    """Write random toy weights where ``run`` points; returns the paths written. ``skip_encoders`` (``tiny`` only):
    encoders whose weights come from elsewhere (the pipeline's ``pretrain_encoder`` stage).

    ``tiny`` builds exactly the configured architectures (merv-tiny's encoder kinds only); ``standin`` builds any
    preset's families at toy size (:mod:`merv.models.standins`), in the layout of :func:`with_local_weights`, and
    fails if the config would build a different shape than the weights (e.g. timm dimensions not set).
    """
    if kind == "tiny":
        from merv.data.synth import tokenizer_corpus
        from merv.models.tiny import build_tiny_weights

        return build_tiny_weights(run, tokenizer_corpus(), seed=seed, skip_encoders=skip_encoders)
    if skip_encoders:
        raise ValueError("stand-in weights are built for every encoder: skip_encoders is for tiny weights")
    from merv.models.standins import build_standin_weights

    folder = Path(run.model.llm.weights).parent
    expected = with_local_weights(run, folder)
    if expected.model != run.model:
        raise ValueError(
            f"stand-in weights are written as <folder>/<encoder id>[/model.safetensors] and <folder>/llm; "
            f"point every weight of {run.model.name} into {folder} that way"
        )
    built = build_standin_weights(run, folder, seed=seed)
    for have, got in zip(run.model.encoders, built.model.encoders, strict=True):
        if have.model_kwargs != got.model_kwargs:
            raise ValueError(
                f"encoder {have.id!r}: its stand-in is built with model_kwargs {got.model_kwargs}, but the config says "
                f"{have.model_kwargs}; set them in the config so the model is built in the same shape"
            )
    return [Path(p.path) for p in weight_parts(run)]
