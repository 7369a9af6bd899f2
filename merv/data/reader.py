"""Reading a shard folder (one written in one piece by :func:`merv.data.shards.write_shards`, or gathered from parts by
:func:`merv.data.parts.gather_parts`: the same layout): its manifest, its shards' keys and its decoded samples."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def read_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{shard_dir}: no manifest.json (not a merv shard folder; run `merv shard` first)")
    return json.loads(path.read_text())


def shard_urls(shard_dir: Path) -> list[str]:
    return [str(Path(shard_dir) / s["name"]) for s in read_manifest(shard_dir)["shards"]]


def iter_samples(shard_dir: Path, shuffle_buffer: int = 0, seed: int = 0) -> Iterator[dict]:
    """Decoded samples ``{"frames": uint8 [F, H, W, 3] or None, "meta": {...}}`` in shard order (or
    buffer-shuffled)."""
    import random

    import webdataset as wds

    pipeline = [wds.SimpleShardList(shard_urls(shard_dir)), wds.tarfile_to_samples()]
    if shuffle_buffer:
        pipeline.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed)))
    for raw in wds.DataPipeline(*pipeline):
        yield decode_sample(raw)


def decode_sample(raw: dict) -> dict:
    """Raw tar members of one sample -> ``{"frames": uint8 [F, H, W, 3], "meta": dict}`` (``min(H, W)`` is the
    settings' size); ``frames`` is None for a text-only sample (``meta["modality"] == "text"``)."""
    meta = raw["json"] if isinstance(raw["json"], dict) else json.loads(raw["json"])
    names = sorted(k for k in raw if k.endswith(".jpg"))
    if "frames.npy" in raw:
        frames = np.load(io.BytesIO(raw["frames.npy"]))
    elif names:
        from PIL import Image

        frames = np.stack([np.asarray(Image.open(io.BytesIO(raw[n])).convert("RGB")) for n in names])
    else:
        frames = None
    return {"frames": frames, "meta": meta}


def shard_keys(shard_dir: Path, name: str) -> list[str]:
    """The keys of the samples in one shard (bad items excluded), in order, from its index."""
    index = json.loads((Path(shard_dir) / f"{name.removesuffix('.tar')}.json").read_text())
    bad = {b["key"] for b in index["bad"]}
    return [k for k in index["keys"] if k not in bad]


def sample_keys(shard_dir: Path) -> list[str]:
    """Every sample's key, in the shard folder's order."""
    return [k for s in read_manifest(shard_dir)["shards"] for k in shard_keys(shard_dir, s["name"])]
