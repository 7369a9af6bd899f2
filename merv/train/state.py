"""Resumable training state: ``<out>.work/step-NNNNNNNN/`` folders written atomically during a stage.

Each holds the trainable model weights and the optimizer state (``torch.distributed.checkpoint``, one shard per rank),
a ``meta.json`` with the step, the data position, the LR scheduler, the metrics so far and the fingerprint of what is
being trained, and one ``rank-<r>.json`` per rank with that rank's own data position and RNG states. A run that finds
a folder with its own fingerprint continues from it and ends bitwise where an uninterrupted run ends (on CPU, same
threads); the data it skips is never decoded again.

Trust: every state ends with ``manifest.json``, the sha256 and size of each of its files, written last (the folder
is renamed into place after it). Resume reads nothing of a state before its files match the manifest, and it never
unpickles anything but DCP's own metadata classes and plain values (a restricted unpickler, then
``torch.load(weights_only=True)``), so a crafted ``.metadata`` cannot run code even behind a rewritten manifest. A
damaged newest state (changed bytes, truncated, files missing or added) is set aside with a warning that names it and
the intact state resumed instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from merv.data.loader import Position

log = logging.getLogger(__name__)

PATTERN = "step-{:08d}"
STATE_NAME = re.compile(r"step-\d{8}")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "merv-train-state/1"
DAMAGED_SUFFIX = ".damaged"
HASH_BLOCK = 1 << 22


class DamagedState(ValueError):
    """A training state that fails its manifest or holds something resume will not load; the reason says which
    file and why."""


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


# ------------------------------------------------------------------------------------------------------------------
# digests


def file_digest(path: Path) -> dict:
    """``{"sha256", "bytes"}`` of a file, read in blocks (hashlib releases the GIL: threads hash files in parallel)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def _digests(root: Path, names: list[str]) -> dict[str, dict]:
    if not names:
        return {}
    with ThreadPoolExecutor(max(1, min(4, len(names), os.cpu_count() or 1))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(root / n), names), strict=True))


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths) but the manifest itself; links count as files, so that
    one pointing elsewhere is caught by the manifest check rather than followed silently."""
    found = []
    for path in folder.rglob("*"):
        if path.is_symlink() or path.is_file():
            found.append(path.relative_to(folder).as_posix())
    return sorted(f for f in found if f != MANIFEST)


def read_manifest(folder: Path) -> dict:
    """The state's manifest, checked for shape (not yet against the files)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise DamagedState(f"{MANIFEST} is missing (the state was cut off while written, or by an older merv)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedState(f"{MANIFEST} is not valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise DamagedState(f"{MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    for name, entry in files.items():
        well_formed = isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
        if not well_formed or type(entry.get("bytes")) is not int:
            raise DamagedState(f"{MANIFEST}: the entry of {name!r} is malformed")
    return manifest


def _check_files(folder: Path, manifest: dict, d) -> None:
    """Every listed file is there with its size and sha256, and nothing else is. Sizes are checked on every rank;
    the hashing is shared out among the ranks, and every rank learns which files failed."""
    from merv.train.distributed import all_reduce_sums

    listed = manifest["files"]
    present = _files(folder)
    if extra := sorted(set(present) - set(listed)):
        raise DamagedState(f"{extra[0]}: not in the manifest")
    if missing := sorted(set(listed) - set(present)):
        raise DamagedState(f"{missing[0]}: missing")
    names = sorted(listed)
    for name in names:
        if (folder / name).is_symlink():
            raise DamagedState(f"{name}: a symbolic link, not a file the run wrote")
        size = (folder / name).stat().st_size
        if size != listed[name]["bytes"]:
            raise DamagedState(f"{name}: {size} bytes, the manifest says {listed[name]['bytes']} (truncated?)")
    mine = names[d.rank :: d.world_size]
    got = _digests(folder, mine)
    bad = [float(n in got and got[n]["sha256"] != listed[n]["sha256"]) for n in names]
    for name, flag in zip(names, all_reduce_sums(bad, d), strict=True):
        if flag:
            raise DamagedState(f"{name}: its sha256 differs from the manifest's (changed bytes)")


# ------------------------------------------------------------------------------------------------------------------
# loading without running code


def _safe_globals() -> dict[tuple[str, str], object]:
    """What DCP's ``.metadata`` pickle may name: its own metadata dataclasses and enums, torch sizes, dtypes and
    layouts, and paths. Nothing that runs code when called with the pickle's arguments."""
    import dataclasses
    import enum
    import inspect
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_metadata

    allowed: dict[tuple[str, str], object] = {}
    for name, value in vars(dcp_metadata).items():
        ours = inspect.isclass(value) and value.__module__ == dcp_metadata.__name__
        if ours and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
            allowed[(dcp_metadata.__name__, name)] = value
    allowed[(dcp_fs.__name__, "_StorageInfo")] = dcp_fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :func:`_safe_globals` (the ``find_class`` restriction of Python's pickle
    documentation): a global outside the list is refused by name, before anything is called."""

    allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if _MetadataUnpickler.allowed is None:
            _MetadataUnpickler.allowed = _safe_globals()
        if (module, name) not in _MetadataUnpickler.allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not part of DCP's metadata")
        return _MetadataUnpickler.allowed[(module, name)]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id: not part of DCP's metadata")


def parse_metadata(data: bytes):
    """DCP's ``.metadata`` from its bytes, through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # any malformed pickle: the reason is what matters
        raise DamagedState(f"dcp/.metadata: {type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata):
        raise DamagedState(f"dcp/.metadata holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def _safe_value(blob: bytes, what: str):
    try:
        return torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:  # weights_only refuses globals it does not know: say which
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DamagedState(f"{what}: refused by torch.load(weights_only=True): {reason}") from None


def _check_contents(folder: Path, manifest: dict):
    """Parse the metadata and every non-tensor value (the optimizer's lr, betas...) the safe way, before any tensor
    of the model is touched; every storage the metadata points at must be a file of the manifest."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = parse_metadata((folder / "dcp" / ".metadata").read_bytes())
    listed = set(manifest["files"])
    for index, info in (metadata.storage_data or {}).items():
        name = f"dcp/{info.relative_path}"
        if name not in listed or ".." in Path(info.relative_path).parts:
            raise DamagedState(f"dcp/.metadata points {index.fqn} at {info.relative_path!r}, not a file of the state")
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(folder / name, "rb") as f:
                f.seek(info.offset)
                _safe_value(f.read(info.length), f"{name} ({index.fqn})")
    return metadata


def verify_state(folder: Path, d=None) -> dict:
    """Check ``folder`` against its manifest and parse what resume will unpickle, the safe way; returns the
    manifest or raises :class:`DamagedState` with the file and the reason. Collective under several processes."""
    from merv.train.distributed import Dist

    d = d or Dist()
    manifest = read_manifest(folder)
    _check_files(folder, manifest, d)
    _check_contents(folder, manifest)
    return manifest


def _reader(folder: Path, metadata_sha256: str):
    """DCP's file reader, but its metadata comes from the restricted unpickler, from bytes whose sha256 is the one
    verified (what is parsed is what was checked, even if the file changes in between)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class VerifiedReader(FileSystemReader):
        def read_metadata(self):
            data = (Path(self.path) / ".metadata").read_bytes()
            if hashlib.sha256(data).hexdigest() != metadata_sha256:
                raise DamagedState("dcp/.metadata changed after it was verified")
            metadata = parse_metadata(data)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return VerifiedReader(folder / "dcp")


def _planner():
    """DCP's load planner, with every non-tensor value parsed by ``torch.load(weights_only=True)`` first (DCP itself
    loads them with ``weights_only=False``)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            _safe_value(value.getvalue(), f"value {read_item.dest_index.fqn}")
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()


# ------------------------------------------------------------------------------------------------------------------
# save, find, load


def save_state(
    work: Path, step: int, model, optimizer, scheduler, position: Position, extra: dict, keep_last: int, d=None
) -> Path:
    """Write ``work/step-<step>`` (temp name, manifest last, then rename) and keep only the newest ``keep_last``.

    Collective under several processes: every rank writes its shard and digests it, rank 0 the metadata, the
    manifest and the rename.
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
    # each rank digests the shards it wrote, so the hashing is spread like the writing
    own = sorted(f"dcp/{p.name}" for p in (tmp / "dcp").glob(f"__{d.rank}_*.distcp"))
    record = {"rank": d.rank, "data_position": asdict(position), "rng": rng_state(), "digests": _digests(tmp, own)}
    (tmp / f"rank-{d.rank}.json").write_text(json.dumps(record))
    barrier(d)
    if not d.is_main:
        barrier(d)
        return final
    meta = {"step": step, "data_position": asdict(position), "scheduler": scheduler.state_dict(), **extra}
    (tmp / "meta.json").write_text(json.dumps(meta))
    digests = {}
    for rank_file in sorted(tmp.glob("rank-*.json")):
        digests |= json.loads(rank_file.read_text())["digests"]
    digests |= _digests(tmp, [f for f in _files(tmp) if f not in digests])
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": digests}
    (tmp / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp / (MANIFEST + ".tmp"), tmp / MANIFEST)
    if final.exists():  # a damaged state of this step that was set aside, or one of other settings
        shutil.rmtree(final)
    tmp.rename(final)
    for old in _states(work)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def _states(work: Path) -> list[Path]:
    """Complete state folders, oldest first (temporary and set-aside ones are not states)."""
    return sorted(p for p in work.glob("step-*") if STATE_NAME.fullmatch(p.name) and p.is_dir())


def _fingerprint_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: checked (and reported) with the manifest when the fingerprint could match


def latest_state(work: Path, fingerprint: str, d=None) -> Path | None:
    """The newest intact state folder written for ``fingerprint``; stale, partial and damaged ones are skipped.

    States of other settings are ignored. A damaged state of these settings (or one whose settings cannot be read)
    is renamed ``<name>.damaged`` with a warning naming it, the reason and the state resumed instead.
    Collective under several processes: every rank reaches the same answer.
    """
    from merv.train.distributed import Dist, barrier

    d = d or Dist()
    if not work.is_dir():
        return None
    damaged: list[tuple[Path, str]] = []
    chosen = None
    for folder in reversed(_states(work)):
        own = _fingerprint_of(folder)
        if own is not None and own != fingerprint:
            continue
        try:
            verify_state(folder, d)
        except DamagedState as e:
            damaged.append((folder, str(e)))
            continue
        if own is None:  # meta.json was in the manifest, so this cannot happen unless the manifest is forged
            damaged.append((folder, "meta.json does not name the settings it was written for"))
            continue
        chosen = folder
        break
    if damaged:
        what = "; ".join(f"{f.name}: {reason}" for f, reason in damaged)
        instead = f"resuming from {chosen.name} instead" if chosen else "no intact state is left: starting over"
        if d.is_main:
            log.warning("training state damaged, set aside as *%s (%s); %s", DAMAGED_SUFFIX, what, instead)
            for folder, _ in damaged:
                aside = folder.with_name(folder.name + DAMAGED_SUFFIX)
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)
        barrier(d)
    return chosen


def load_state(folder: Path, model, optimizer, scheduler, rank: int = 0) -> tuple[int, Position, dict]:
    """Restore weights, optimizer, scheduler, and this rank's RNG states and data position from ``folder`` (checked
    by :func:`latest_state` first); returns ``(step, position, meta)``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    manifest = read_manifest(folder)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(
            state,
            storage_reader=_reader(folder, manifest["files"]["dcp/.metadata"]["sha256"]),
            planner=_planner(),
        )
    except CheckpointException as e:  # DCP's own exception is a BaseException carrying each rank's failure
        first = next(iter(e.failures.values()))[0]
        raise DamagedState(
            f"training state {folder} passed its checks but could not be loaded ({type(first).__name__}: "
            f"{str(first)[:300]}); remove it to start the stage over"
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options()
    )
    meta = json.loads((folder / "meta.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    own = json.loads((folder / f"rank-{rank}.json").read_text())
    set_rng_state(own["rng"])
    return meta["step"], Position(**own["data_position"]), meta
