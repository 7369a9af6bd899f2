"""Scatter–gather sharding: a training split cut into parts, each sharded by its own job, then gathered into one
shard folder that reads exactly like one written in one piece.

The rule that cuts a split: **fixed-size ranges of the training JSON's own order** (part ``k`` holds samples
``k * items_per_part`` up to the next multiple). A training JSON grows by appending, and appended samples only ever
land in the last part or in new ones, so every earlier part keeps its exact items and its job is not rerun. The two
other candidates move items on an append: a hash of the key modulo the part count sends new items into every part
(each reruns), and ranges of the *sorted* keys shift every boundary after the first new key (ids such as
``v_00123`` sort anywhere among the old ones). An edit in the middle of the JSON reruns the part that holds it.

:func:`plan_parts` writes a plan folder: ``parts.json`` (the parts in order), and per part ``part-NNNNN.json`` (its
samples as a training JSON, each with its ``id`` made explicit, so keys and records are those of the whole JSON) and
``part-NNNNN.media.json`` (the stat index of its media, :mod:`merv.data.media`). The pipeline keys each part's job by
:func:`part_digest` (the part's samples and its media's size and mtime), not by file times.

:func:`gather_parts` hard-links the parts' shards (copies where links are impossible) into one folder, numbered in
part order, with their indexes renamed, and writes the folder's ``quarantine.jsonl`` and ``manifest.json`` once,
over every part: the same samples, in the same order, as one ``merv shard`` run over the whole JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from merv.data.items import DataFormatError, load_json_list, collect_items
from merv.data.media import build_index

log = logging.getLogger(__name__)

PLAN_FORMAT = "merv-parts/1"
PART_PATTERN = "part-{:05d}"


def part_ranges(n_items: int, items_per_part: int) -> list[range]:
    """Positions of each part's items: fixed-size ranges of the input order (the last one may be short)."""
    if items_per_part < 1:
        raise ValueError(f"items_per_part must be positive, got {items_per_part}")
    return [range(start, min(start + items_per_part, n_items)) for start in range(0, n_items, items_per_part)]


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def plan_parts(json_path: Path, out: Path, items_per_part: int, root: Path | None = None) -> dict:
    """Cut a training JSON into parts (see the module docstring) and write the plan folder ``out``; files whose
    content is unchanged are left as they are. Returns ``parts.json``'s content. A bad JSON raises
    :class:`DataFormatError` naming the sample, as ``merv shard`` would."""
    json_path, out = Path(json_path), Path(out)
    root = Path(root) if root else json_path.parent
    collect_items([json_path], root)  # every sample valid and keys unique, named by the whole JSON's positions
    samples = load_json_list(json_path)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k, positions in enumerate(part_ranges(len(samples), items_per_part)):
        name = PART_PATTERN.format(k)
        # an explicit id keeps the key (and record) a sample has in the whole JSON, where a missing id is its position
        part = [{**samples[i], "id": samples[i].get("id", i)} for i in positions]
        _write_if_changed(out / f"{name}.json", json.dumps(part, separators=(",", ":")))
        index = build_index(out / f"{name}.json", root)
        if index["problem"]:
            raise DataFormatError(f"{json_path} {name}: {index['problem']}")
        index["source_stat"] = None  # the part file's own mtime says nothing: refresh_index rereads it when it moves
        _write_if_changed(out / f"{name}.media.json", json.dumps(index, separators=(",", ":")))
        names.append(name)
    for stale in out.glob("part-*.json"):
        if stale.name.split(".")[0] not in names:
            stale.unlink()
    plan = {
        "format": PLAN_FORMAT,
        "source": str(json_path),
        "root": str(root),
        "items": len(samples),
        "items_per_part": items_per_part,
        "parts": names,
    }
    _write_if_changed(out / "parts.json", json.dumps(plan, indent=1))
    return plan


def read_plan(plan_dir: Path) -> dict:
    path = Path(plan_dir) / "parts.json"
    plan = json.loads(path.read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path}: not a merv part plan (format {plan.get('format')!r}, expected {PLAN_FORMAT!r})")
    return plan


def part_digest(plan_dir: Path, part: str) -> str:
    """What a part's shards depend on besides the shard settings: its samples and its media's size and mtime (the
    media index's listing; the index's own bookkeeping is left out)."""
    plan_dir = Path(plan_dir)
    media = json.loads((plan_dir / f"{part}.media.json").read_text())["media"]
    h = hashlib.sha256((plan_dir / f"{part}.json").read_bytes())
    h.update(json.dumps(media, separators=(",", ":")).encode())
    return h.hexdigest()


def refresh_part_indexes(plan_dir: Path) -> list[str]:
    """Restat the media of every part of a plan and rewrite the indexes whose media changed (size, mtime, appeared
    or vanished); returns those parts. Run when planning, so that a video replaced in place reaches its part."""
    from merv.data.media import stat_entry, write_index

    plan_dir = Path(plan_dir)
    try:
        parts = read_plan(plan_dir)["parts"]
    except (OSError, ValueError):
        return []  # no plan yet (the plan rule writes it)
    changed = []
    for part in parts:
        path = plan_dir / f"{part}.media.json"
        try:
            index = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        media = [stat_entry(Path(p)) for p, _, _ in index["media"]]
        if media != index["media"]:
            write_index({**index, "media": media}, path)
            changed.append(part)
    return changed


def gather_parts(part_dirs: list[Path], out: Path) -> dict:
    """Gather shard folders written part by part (in order) into ``out``: their shards numbered on, hard-linked,
    their indexes renamed, and one ``quarantine.jsonl`` and ``manifest.json`` over them all. Returns the
    manifest. Parts sharded with other settings (fingerprints differ) are refused."""
    from merv.data.reader import read_manifest
    from merv.data.shards import SHARD_PATTERN, write_manifest

    out = Path(out)
    if not part_dirs:
        raise ValueError(f"{out}: no parts to gather")
    manifests = [read_manifest(p) for p in part_dirs]
    fingerprints = {m["fingerprint"] for m in manifests}
    if len(fingerprints) > 1:
        raise ValueError(f"{out}: the parts were sharded with different settings ({sorted(fingerprints)})")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard-*"):
        stale.unlink()
    indexes, parts = [], []
    for part_dir, manifest in zip(part_dirs, manifests, strict=True):
        part_dir = Path(part_dir)
        for shard in manifest["shards"]:
            src = part_dir / shard["name"]
            index = json.loads(src.with_suffix(".json").read_text())
            if not src.is_file() or src.stat().st_size != index["bytes"]:
                raise ValueError(f"{src}: missing or not the size its index records ({index['bytes']} bytes)")
            name = SHARD_PATTERN.format(len(indexes))
            link_file(src, out / f"{name}.tar")
            index["name"] = f"{name}.tar"
            (out / f"{name}.json").write_text(json.dumps(index))
            indexes.append(index)
        parts.append({"part": part_dir.name, "input": manifest["input"], "shards": len(manifest["shards"])})
    n_input = sum(m["input"] for m in manifests)
    manifest = write_manifest(out, indexes, n_input, manifests[0]["settings"], fingerprints.pop(), parts=parts)
    log.info("%s: %d parts gathered, %d samples in %d shards", out, len(parts), manifest["samples"], len(indexes))
    return manifest


def link_file(src: Path, dst: Path) -> None:
    """A hard link (no bytes copied: the parts stay the only copy on disk), else a copy (another file system)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
