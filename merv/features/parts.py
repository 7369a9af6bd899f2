"""Scatter–gather feature extraction: one encoder's cache over a split made in parts, each by its own job, then
gathered into one cache with the bytes of a single extraction.

**The parts are the split's shard parts** (:mod:`merv.data.parts`): part ``k`` of a cache is ``merv features`` over
the shard folder of part ``k``, which holds the very tars that the gathered split links (the same samples, frames and
shard boundaries). So the feature parts inherit the shard parts' stability: appending samples to a training JSON
reruns the last part and the new ones, an edit reruns the part that holds it, and a feature part starts as soon as
its shard part is written, without waiting for the others. A shard folder written in one piece (or anyone's) can be
cut by hand instead: ``merv features DIR --shard-range A:B`` extracts shards ``A`` to ``B-1`` into a part.

:func:`gather_features` lines the parts' cache shards up, in order, with the gathered shard folder's shards, checks
each one against the shard it stands for (its samples, and the frames and settings it was made from, through the
cache's per-shard key), hard-links it under that shard's name with its index renamed, and writes the cache's
``manifest.json`` once: the same files, byte for byte, as one ``merv features`` over the gathered folder.

The pipeline's layout of these parts is :mod:`merv.workflow`'s (``Workflow.feature_part``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from merv.data.parts import link_file
from merv.data.reader import read_manifest, shard_keys
from merv.features.cache import FeatureCacheError, read_cache_manifest, source_digest
from merv.features.extract import cache_manifest, remove_stale, save_manifest, shard_key

log = logging.getLogger(__name__)


def _without_source(key: dict) -> dict:
    """A cache key without its split-wide source digest: what every part of one cache shares."""
    return {k: v for k, v in key.items() if k != "source_frames"}


def gather_features(parts: list[Path], shard_dir: Path, out: Path) -> dict:
    """Gather part caches (in order) of one encoder into the cache ``out`` of the shard folder ``shard_dir``; returns
    its manifest. Parts made with other settings, or that do not line up with the shards (a part missing, extra, or
    made from other frames), are refused naming the part and the shard."""
    parts, shard_dir, out = [Path(p) for p in parts], Path(shard_dir), Path(out)
    if not parts:
        raise FeatureCacheError(f"{out}: no part caches to gather")
    manifests = [read_cache_manifest(p) for p in parts]
    encoder, key = manifests[0]["encoder"], _without_source(manifests[0]["key"])
    for part, manifest in zip(parts[1:], manifests[1:], strict=True):
        other = _without_source(manifest["key"])
        diffs = sorted(k for k in set(key) | set(other) if key.get(k) != other.get(k))
        if manifest["encoder"] != encoder or diffs:
            raise FeatureCacheError(
                f"{out}: {part} was extracted with other settings than {parts[0]} "
                f"(encoder {manifest['encoder']!r} vs {encoder!r}; fields that differ: {diffs})"
            )
    targets = read_manifest(shard_dir)
    entries = [(part, shard["name"]) for part, m in zip(parts, manifests, strict=True) for shard in m["shards"]]
    if len(entries) != len(targets["shards"]):
        raise FeatureCacheError(
            f"{out}: the parts hold {len(entries)} cache shards, {shard_dir} has {len(targets['shards'])} "
            "(a part missing or extra, or parts of another split)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # unfinished until the new manifest is written
    remove_stale(out, set())
    indexes = []
    for (part, name), target in zip(entries, targets["shards"], strict=True):
        src, dst = part / name, out / target["name"]
        where = f"{src} (for {target['name']} of {shard_dir})"
        index = json.loads((part / f"{name.removesuffix('.tar')}.json").read_text())
        if index["keys"] != shard_keys(shard_dir, target["name"]):
            raise FeatureCacheError(f"{where}: holds other samples than that shard (parts out of order?)")
        if index["shard_key"] != shard_key(key, target):
            raise FeatureCacheError(f"{where}: made from other frames than that shard holds: extract the part again")
        if not src.is_file() or src.stat().st_size != index["bytes"]:
            raise FeatureCacheError(f"{where}: missing or not the size its index records ({index['bytes']} bytes)")
        link_file(src, dst)
        index["name"] = target["name"]
        (out / f"{target['name'].removesuffix('.tar')}.json").write_text(json.dumps(index))
        indexes.append(index)
    full_key = {**key, "source_frames": source_digest(targets, key["num_frames"])}
    manifest = cache_manifest(encoder, full_key, shard_dir, targets, indexes)
    save_manifest(out, manifest)
    log.info("%s: %d parts gathered, %d samples in %d shards", out, len(parts), manifest["samples"], len(indexes))
    return manifest
