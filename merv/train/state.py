"""Resumable training state: ``<out>.work/step-NNNNNNNN/`` folders written atomically during a stage.

Each holds the trainable model weights and the optimizer state (``torch.distributed.checkpoint``, one shard per rank),
a ``meta.json`` with the step, the data position, the LR scheduler, the metrics so far and the fingerprint of what is
being trained, and one ``rank-<r>.json`` per rank with that rank's own data position and RNG states. A run that finds
a folder with its own fingerprint continues from it and ends bitwise where an uninterrupted run ends (on CPU, same
threads); the data it skips is never decoded again.

Trust (:func:`resume_state`):

- every state ends with ``manifest.json``, the sha256 and size of each of its files, written last (the folder is
  renamed into place after it);
- nothing of a state is used before the files it comes from match the manifest: the small files and DCP's
  ``.metadata`` when the state is chosen, each rank's data files before the first tensor is copied into the model
  (hashed in a thread while DCP plans the load);
- nothing is unpickled but DCP's own metadata classes and plain values (a restricted unpickler, and
  ``torch.load(weights_only=True)`` for the optimizer's non-tensor values, which DCP itself loads with
  ``weights_only=False``): a crafted ``.metadata`` cannot run code even behind a rewritten manifest;
- a damaged state (changed bytes, truncated, files missing or added, a refused pickle) is set aside as
  ``<name>.damaged`` with a warning that names it, the reason and the state resumed instead.

The manifest is no signature: whoever can write the work folder can rewrite it. It catches corruption (disks, copies,
a run killed mid-write) and tampering that leaves it alone; code execution is closed by the restricted loading, which
does not depend on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
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
HASH_BLOCK = 64 << 20
PARALLEL_HASH_BYTES = 64 << 20


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
    """``{"sha256", "bytes"}`` of a file, read in large blocks: hashlib and the reads release the GIL, and few blocks
    mean a hashing thread seldom waits for the GIL beside busy Python work. (Not memory-mapped: a file truncated
    under a mapping kills the process with SIGBUS.)"""
    h, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(max(1, min(HASH_BLOCK, os.fstat(f.fileno()).st_size)))
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            h.update(view[:n])
            size += n
    return {"sha256": h.hexdigest(), "bytes": size}


def _digests(root: Path, names: list[str]) -> dict[str, dict]:
    """Digests of ``names`` under ``root``: in parallel threads when there is much to hash (many ranks' shards)."""
    sizes = [(root / n).stat().st_size for n in names]
    if sum(sizes) - max(sizes, default=0) < PARALLEL_HASH_BYTES:  # one big file: threads would only add overhead
        return {n: file_digest(root / n) for n in names}
    with ThreadPoolExecutor(min(8, len(names), os.cpu_count() or 1)) as pool:
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
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DamagedState(f"{MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    for name, entry in files.items():
        well_formed = isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
        if not well_formed or type(entry.get("bytes")) is not int:
            raise DamagedState(f"{MANIFEST}: the entry of {name!r} is malformed")
    return manifest


def _check_listing(folder: Path, manifest: dict) -> list[str]:
    """Every listed file is there with its size, and nothing else is (cheap: no file is read); returns the names."""
    listed = manifest["files"]
    present = _files(folder)
    if extra := sorted(set(present) - set(listed)):
        raise DamagedState(f"{extra[0]}: not in the manifest")
    if missing := sorted(set(listed) - set(present)):
        raise DamagedState(f"{missing[0]}: missing")
    for name in sorted(listed):
        if (folder / name).is_symlink():
            raise DamagedState(f"{name}: a symbolic link, not a file the run wrote")
        size = (folder / name).stat().st_size
        if size != listed[name]["bytes"]:
            raise DamagedState(f"{name}: {size} bytes, the manifest says {listed[name]['bytes']} (truncated?)")
    return sorted(listed)


def _check_digests(folder: Path, manifest: dict, got: dict[str, dict]) -> None:
    for name, digest in got.items():
        if name not in manifest["files"]:
            raise DamagedState(f"{name}: not in the manifest")
        if digest["sha256"] != manifest["files"][name]["sha256"]:
            raise DamagedState(f"{name}: its sha256 differs from the manifest's (changed bytes)")


def _is_data(name: str) -> bool:
    return name.startswith("dcp/") and name.endswith(".distcp")


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


_PARSED: dict[str, object] = {}  # the metadata check_state parsed last, by its sha256: load_state reuses it


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


def check_state(folder: Path) -> dict:
    """The checks made when a state is chosen, before any of it is used: the manifest, every file's presence and
    size, the digests of every file but the (large) data files, and DCP's metadata through the restricted
    unpickler, pointing only at files of the state. Returns the manifest or raises :class:`DamagedState`."""
    manifest = read_manifest(folder)
    names = _check_listing(folder, manifest)
    small = [n for n in names if not _is_data(n) and n != "dcp/.metadata"]
    _check_digests(folder, manifest, _digests(folder, small))
    data = (folder / "dcp" / ".metadata").read_bytes() if "dcp/.metadata" in names else None
    if data is None:
        raise DamagedState("dcp/.metadata: missing")
    digest = hashlib.sha256(data).hexdigest()
    _check_digests(folder, manifest, {"dcp/.metadata": {"sha256": digest}})
    metadata = parse_metadata(data)
    for index, info in (metadata.storage_data or {}).items():
        if f"dcp/{info.relative_path}" not in manifest["files"] or ".." in Path(info.relative_path).parts:
            raise DamagedState(f"dcp/.metadata points {index.fqn} at {info.relative_path!r}, not a file of the state")
    _PARSED.clear()
    _PARSED[digest] = metadata
    return manifest


def verify_state(folder: Path) -> dict:
    """Everything :func:`check_state` checks, and the digests of the data files too (what resume checks in two
    steps, all at once); returns the manifest or raises :class:`DamagedState`."""
    manifest = check_state(folder)
    _check_digests(folder, manifest, _digests(folder, [n for n in manifest["files"] if _is_data(n)]))
    return manifest


def _in_background(fn, *args) -> Future:
    pool = ThreadPoolExecutor(1, thread_name_prefix="train-state")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def _reader(folder: Path, manifest: dict, hashing: Future):
    """DCP's file reader, but: its metadata comes from the restricted unpickler (from bytes whose sha256 is the
    manifest's, so what is parsed is what was checked), and before it reads any item it checks the digests of the
    data files it reads (``hashing``: those hashed in the background) and puts the non-tensor values first, so that
    a refused one stops the load before any tensor is copied into the model."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadItemType

    class VerifiedReader(FileSystemReader):
        def read_metadata(self):
            data = (Path(self.path) / ".metadata").read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != manifest["files"]["dcp/.metadata"]["sha256"]:
                raise DamagedState("dcp/.metadata: its sha256 differs from the manifest's (changed bytes)")
            metadata = _PARSED.pop(digest, None) or parse_metadata(data)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            names = sorted({f"dcp/{self.storage_data[item.storage_index].relative_path}" for item in plan.items})
            got = hashing.result()
            got = {**got, **_digests(folder, [n for n in names if n not in got])}
            _check_digests(folder, manifest, {n: got[n] for n in names})
            items = sorted(plan.items, key=lambda item: item.type != LoadItemType.BYTE_IO)  # stable: values first
            return super().read_data(dataclasses.replace(plan, items=items), planner)

    return VerifiedReader(folder / "dcp")


def _planner():
    """DCP's load planner, but every non-tensor value is loaded by ``torch.load(weights_only=True)`` (DCP's own
    ``load_bytes`` uses ``weights_only=False``; otherwise the same two lines); ``touched`` tells whether any tensor
    of the model or optimizer was written to."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        touched = False

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            obj = _safe_value(value.getvalue(), f"value {fqn}")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

        def resolve_tensor(self, read_item):
            self.touched = True  # the tensor returned is the model's (or the optimizer's) own
            return super().resolve_tensor(read_item)

    return SafeLoadPlanner()


def _writer(path: Path):
    """DCP's file writer without its own fsync (:func:`save_state` syncs while it hashes); remembers the data files
    this rank wrote."""
    from torch.distributed.checkpoint import FileSystemWriter

    class RecordingWriter(FileSystemWriter):
        written: list[str] = []

        def write_data(self, plan, planner):
            future = super().write_data(plan, planner)
            self.written = sorted({f"dcp/{r.storage_data.relative_path}" for r in future.value()})
            return future

    return RecordingWriter(path, sync_files=False)


def _fsync(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------------------------
# save, find, load


def save_state(
    work: Path, step: int, model, optimizer, scheduler, position: Position, extra: dict, keep_last: int, d=None
) -> Path:
    """Write ``work/step-<step>`` (temp name, manifest last, then rename) and keep only the newest ``keep_last``.

    Collective under several processes: every rank writes its shard and digests it, rank 0 the metadata, the
    manifest and the rename. The digests are computed while the files are synced to disk (both wait on
    something else than Python), so the manifest costs little more than the sync alone.
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
    writer = _writer(tmp / "dcp")
    dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
    hashing = _in_background(_digests, tmp, writer.written)
    _fsync([tmp / n for n in writer.written] + ([tmp / "dcp" / ".metadata"] if d.is_main else []))
    record = {"rank": d.rank, "data_position": asdict(position), "rng": rng_state(), "digests": hashing.result()}
    (tmp / f"rank-{d.rank}.json").write_text(json.dumps(record))
    barrier(d)
    if not d.is_main:
        barrier(d)
        return final
    meta = {"step": step, "data_position": asdict(position), "scheduler": scheduler.state_dict(), **extra}
    (tmp / "meta.json").write_text(json.dumps(meta, allow_nan=False))  # strict JSON: metrics are finite
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


def _find(work: Path, fingerprint: str, damaged: list[tuple[Path, str]]) -> Path | None:
    """The newest state of ``fingerprint`` that passes :func:`check_state`; failures are added to ``damaged``."""
    if not work.is_dir():
        return None
    for folder in reversed(_states(work)):
        if any(folder == f for f, _ in damaged):
            continue
        own = _fingerprint_of(folder)
        if own is not None and own != fingerprint:
            continue  # a state of other settings
        try:
            check_state(folder)
        except DamagedState as e:
            damaged.append((folder, str(e)))
            continue
        if own is None:  # meta.json is in the manifest: only a rewritten manifest gets here
            damaged.append((folder, "meta.json does not name the settings it was written for"))
            continue
        return folder
    return None


def _set_aside(damaged: list[tuple[Path, str]], chosen: Path | None, d) -> None:
    """Warn about the damaged states (naming the one resumed instead) and rename them ``<name>.damaged``."""
    from merv.train.distributed import barrier

    if not damaged:
        return
    if d.is_main:
        what = "; ".join(f"{f.name}: {reason}" for f, reason in damaged)
        instead = f"resuming from {chosen.name} instead" if chosen else "no intact state is left: starting over"
        log.warning("training state damaged, set aside as *%s (%s); %s", DAMAGED_SUFFIX, what, instead)
        for folder, _ in damaged:
            if folder.exists():
                aside = folder.with_name(folder.name + DAMAGED_SUFFIX)
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)
    barrier(d)


def latest_state(work: Path, fingerprint: str, d=None) -> Path | None:
    """The newest state folder written for ``fingerprint`` that passes :func:`check_state`; stale and partial ones
    are skipped, damaged ones set aside with a warning. (:func:`resume_state` also checks the data files.)"""
    from merv.train.distributed import Dist

    d = d or Dist()
    damaged: list[tuple[Path, str]] = []
    chosen = _find(work, fingerprint, damaged)
    _set_aside(damaged, chosen, d)
    return chosen


def load_state(folder: Path, model, optimizer, scheduler, rank: int = 0) -> tuple[int, Position, dict]:
    """Restore weights, optimizer, scheduler, and this rank's RNG states and data position from ``folder`` (chosen
    by :func:`latest_state`); returns ``(step, position, meta)``.

    Raises :class:`DamagedState` when a data file fails its digest or a value is refused; ``touched`` says whether
    the model or optimizer had been written to by then (never, when this rank's own files are damaged).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    manifest = read_manifest(folder)
    # this rank's own shards are hashed while DCP plans the load (plain Python); the digests are checked before
    # the first item is read
    own = [n for n in manifest["files"] if _is_data(n) and Path(n).name.startswith(f"__{rank}_")]
    hashing = _in_background(_digests, folder, own)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    planner = _planner()
    try:
        dcp.load(state, storage_reader=_reader(folder, manifest, hashing), planner=planner)
    except CheckpointException as e:  # DCP's own exception is a BaseException carrying each rank's failure
        first = next(iter(e.failures.values()))[0]
        reason = str(first) if isinstance(first, DamagedState) else f"{type(first).__name__}: {str(first)[:300]}"
        error = DamagedState(reason)
        error.touched = planner.touched
        raise error from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options()
    )
    meta = json.loads((folder / "meta.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    own_record = json.loads((folder / f"rank-{rank}.json").read_text())
    set_rng_state(own_record["rng"])
    return meta["step"], Position(**own_record["data_position"]), meta


def resume_state(work: Path, fingerprint: str, model, optimizer, scheduler, d=None):
    """Load the newest intact state of ``fingerprint`` into the model, optimizer and scheduler; returns ``(folder,
    step, position, meta)``, or None when there is none. Damaged states are set aside, with a warning naming them and
    the state resumed instead. Collective under several processes."""
    from merv.train.distributed import Dist, all_reduce_sum

    d = d or Dist()
    damaged: list[tuple[Path, str]] = []
    while (folder := _find(work, fingerprint, damaged)) is not None:
        try:
            step, position, meta = load_state(folder, model, optimizer, scheduler, d.rank)
        except DamagedState as e:
            damaged.append((folder, str(e)))
            if (
                all_reduce_sum(float(getattr(e, "touched", True)), d)
                and _find(work, fingerprint, list(damaged)) is None
            ):
                _set_aside(damaged, None, d)
                raise DamagedState(
                    f"training state {folder} is damaged ({e}) after part of it was loaded, and no intact state is "
                    "left: it was set aside; run again to start the stage over"
                ) from None
            continue  # an older state overwrites whatever part of this one was loaded
        _set_aside(damaged, folder, d)
        return folder, step, position, meta
    _set_aside(damaged, None, d)
    return None
