"""How a model's weights get where :mod:`merv.weights` finds them: fetched from their sources, or built locally.

Every encoder and the LLM name a ``weights`` path (a timm safetensors file or a transformers folder) and, for the
paper's presets, a ``source``: ``hf:<repo id>`` (a Hugging Face hub repository, downloaded as is) or
``timm:<model name>`` (timm's pretrained weights from its hub repository, saved as a local safetensors file), and a
``revision``: the hub commit to download, so that two users of one preset get the same bytes. A part whose preset
says ``revision: unpinned`` is refused unless ``allow_unpinned`` (then the hub's current commit is taken and
recorded). Beside each fetched weight, ``<path>.source.json`` records the source, the commit and every file's
SHA-256; evaluation manifests carry it. A relative path is looked for under ``$MERV_WEIGHTS`` first, then the working
directory (the project root in the pipeline), and fetched into the first of them. Without a network (or with
``HF_HUB_OFFLINE=1``) :func:`fetch_weights` downloads nothing and fails with every missing weight, where it was
looked for and where it would come from.

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

from merv.config import UNPINNED, RunConfig

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
    revision: str | None = None  # hub commit sha, "unpinned" or None
    key: str = ""  # the config field that pins it, for messages

    @property
    def pinned(self) -> bool:
        return self.revision not in (None, UNPINNED)


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
        WeightPart(
            f"encoder {e.id}",
            e.weights,
            e.source,
            e.kind == "timm_image",
            dict(e.model_kwargs),
            e.revision,
            f"model.encoders.{e.id}.revision",
        )  # fmt: skip
        for e in run.model.encoders
    ]
    llm = run.model.llm
    return parts + [WeightPart("llm", llm.weights, llm.source, False, {}, llm.revision, "model.llm.revision")]


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


def fetch_weights(run: RunConfig, root: str | Path | None = None, allow_unpinned: bool = False) -> list[dict]:
    """Make every weight of ``run`` present, downloading the missing ones from their sources at their pinned
    revisions (a weight fetched earlier at another commit than its pin is fetched again).

    Returns one record per weight (name, path found or written, source, revision and commit, whether it was
    downloaded). Raises :class:`MissingWeightsError` naming every weight that is still missing, after trying all."""
    roots = search_roots(root)
    records, missing = [], []
    for part in weight_parts(run):
        places = candidates(part, roots)
        found = next((p for p in places if is_present(p, part.is_file)), None)
        if found is not None:
            fetched = read_source_record(found)
            if not (part.pinned and fetched and fetched.get("commit") != part.revision):
                if part.pinned and not fetched:
                    log.warning("%s: %s was not fetched by merv: its revision cannot be checked", part.name, found)
                records.append(_summary(part, found, fetched, downloaded=False))
                continue
            log.info("%s: %s holds commit %s, the config pins %s: fetching that", part.name, found,
                     fetched.get("commit"), part.revision)  # fmt: skip
        target = found or places[0]
        reason = _why_not_fetchable(part, allow_unpinned)
        if reason is None:
            try:
                fetched = _download(part, target)
                records.append(_summary(part, target, fetched, downloaded=True))
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


def _summary(part: WeightPart, path: Path, fetched: dict | None, downloaded: bool) -> dict:
    return {"name": part.name, "path": str(path), "source": part.source, "revision": part.revision,
            "commit": (fetched or {}).get("commit"), "downloaded": downloaded}  # fmt: skip


def _why_not_fetchable(part: WeightPart, allow_unpinned: bool) -> str | None:
    if part.source is None:
        return "no source is configured; place the weights there yourself or set a source"
    if hub_offline():
        return "offline (HF_HUB_OFFLINE is set), not downloaded"
    if not part.pinned and not allow_unpinned:
        return (
            f"unpinned (revision {part.revision or 'not set'}): set {part.key} to a hub commit sha, or pass "
            "--allow-unpinned to take the hub's current commit (it is recorded beside the weights)"
        )
    return None


def hub_repo(part: WeightPart) -> str:
    """The hub repository a source downloads from (timm's weights live in its pretrained config's repository)."""
    scheme, name = part.source.split(":", 1)
    if scheme == "timm":
        import timm

        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
        if not hub_id:
            raise ValueError(f"timm has no hub repository for {name!r}")
        return hub_id
    return name


def _download(part: WeightPart, target: Path) -> dict:
    """Fetch ``part`` at its commit into ``target`` through a temporary sibling, renamed at the end (never a
    half-written weight), then record source, commit and file digests beside it; returns that record."""
    from huggingface_hub import HfApi

    from merv.digests import DigestMemo

    scheme, name = part.source.split(":", 1)
    repo = hub_repo(part)
    # unpinned (allowed): the hub's current commit, resolved once, so the files and the record agree
    commit = part.revision if part.pinned else HfApi().model_info(repo).sha
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.unlink(missing_ok=True)
    log.info("fetching %s from %s at commit %s into %s", part.name, part.source, commit, target)
    if scheme == "timm":
        _download_timm(name, part.model_kwargs, tmp, f"{repo}@{commit}")
    else:
        _download_hub(repo, tmp, commit)
    files = DigestMemo(None).files(tmp) if tmp.is_dir() else {target.name: DigestMemo(None).file(tmp)}
    if target.is_dir():  # an incomplete folder (no config.json) left by someone else, or another commit
        shutil.rmtree(target)
    os.replace(tmp, target)
    record = {"format": "merv-fetch/1", "source": part.source, "repo": repo, "revision": part.revision or UNPINNED,
              "commit": commit, "pinned": part.pinned, "files": files}  # fmt: skip
    _write_json(source_record_path(target), record)
    return record


def _write_json(path: Path, obj) -> None:
    import json

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def _download_hub(repo_id: str, folder: Path, commit: str) -> None:
    """A hub repository at ``commit`` as files; PyTorch/TF/Flax pickles are skipped when safetensors weights exist."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id, revision=commit)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    ignore = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx"] if has_safetensors else ["*.h5"]
    snapshot_download(repo_id, revision=commit, local_dir=folder, ignore_patterns=ignore + [".gitattributes"])
    shutil.rmtree(folder / ".cache", ignore_errors=True)  # huggingface_hub's resume records: the folder is complete


def _download_timm(model_name: str, model_kwargs: dict, file: Path, hub_id: str) -> None:
    """timm's pretrained weights (through its own hub loader, at ``<repo>@<commit>``), saved as the state dict merv
    loads back."""
    import timm

    from merv.models.tiny import save_module

    model = timm.create_model(
        model_name, pretrained=True, pretrained_cfg_overlay={"hf_hub_id": hub_id}, num_classes=0, **model_kwargs
    )
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
