"""Encoding one item into its tar members (in worker processes), and the digests that say what a sample depends on:
its record, its media's bytes and stat, and the frames stored per frame count."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from merv.config import fingerprint
from merv.data.items import Item
from merv.data.video import BACKENDS, DEFAULT_BACKEND, VideoError, read_frames
from merv.settings import ShardsSection, parse_size


@dataclass(frozen=True)
class ShardSettings:
    """Everything that determines the bytes of the shards (its fingerprint tags each shard)."""

    frame_counts: tuple[int, ...]
    size: int  # of the short side: frames keep their aspect ratio (encoder transforms crop or squash at load time)
    target_bytes: int = parse_size(ShardsSection.target_size)
    frame_format: Literal["jpg", "npy"] = ShardsSection.frame_format
    jpeg_quality: int = 95
    backend: str = DEFAULT_BACKEND
    resize: Literal["short_side"] = "short_side"  # stored frame geometry; earlier shards were squashed squares
    digests: int = 1  # samples record a digest of their frames per frame count (feature caches are keyed by them)
    scale_in_decoder: bool = ShardsSection.scale_in_decoder  # the decoder scales the frames (video.read_frames)

    def __post_init__(self):
        if not self.frame_counts or min(self.frame_counts) < 1:
            raise ValueError(f"frame counts must be positive, got {list(self.frame_counts)}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown decoding backend {self.backend!r}; available: {list(BACKENDS)}")
        if self.resize != "short_side":
            raise ValueError(f"resize must be 'short_side', got {self.resize!r}")
        if self.frame_format not in ("jpg", "npy"):
            raise ValueError(f"frame_format must be 'jpg' or 'npy', got {self.frame_format!r}")
        object.__setattr__(self, "frame_counts", tuple(sorted(set(self.frame_counts))))

    def record(self) -> dict:
        """The settings as shard indexes and manifests record them, and as their fingerprint hashes them. An option
        added later is left out while it has the value every earlier shard was written with (``scale_in_decoder``
        off): shards written before it keep their fingerprint, and are not rewritten for nothing."""
        record = asdict(self)
        if not self.scale_in_decoder:
            del record["scale_in_decoder"]
        return record

    def fingerprint(self) -> str:
        return fingerprint(self.record())


def encode_item(item: Item, settings: ShardSettings) -> tuple[dict[str, bytes] | None, str | None]:
    """``(tar members, None)`` for a good item, ``(None, reason)`` for a bad one. A text-only item is its ``json``
    record alone."""
    if item.media is None:
        meta = {"key": item.key, "modality": "text", **item.record}
        return {"json": json.dumps(meta, sort_keys=True).encode()}, None
    try:
        frames, positions = read_frames(
            item.media,
            list(settings.frame_counts),
            settings.size,
            time=item.time,
            end_frame=item.end_frame,
            backend=settings.backend,
            folder_fps=item.folder_fps,
            scale_in_decoder=settings.scale_in_decoder,
        )
    except VideoError as e:
        return None, e.reason
    except ValueError as e:  # e.g. an impossible clip window
        return None, f"bad clip window ({e})"
    members: dict[str, bytes] = {}
    if settings.frame_format == "npy":
        buf = io.BytesIO()
        np.save(buf, frames)
        members["frames.npy"] = buf.getvalue()
        stored = [frame.tobytes() for frame in frames]
    else:
        from PIL import Image

        for i, frame in enumerate(frames):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=settings.jpeg_quality)
            members[f"{i:03d}.jpg"] = buf.getvalue()
        stored = [members[f"{i:03d}.jpg"] for i in range(len(frames))]
    meta = {
        "key": item.key,
        "modality": item.modality,
        "source": str(item.media),
        "frame_positions": {str(c): p for c, p in positions.items()},
        # what an encoder of each frame count reads, as stored: its feature cache is keyed by this
        "frame_digests": {str(c): _digest(stored[i] for i in p) for c, p in positions.items()},
        **item.record,
    }
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return members, None


# ------------------------------------------------------------------------------------------------------------------
# Content of an item: what its samples depend on


def media_stat(path: Path) -> list | None:
    """What says a media file (or frame folder) is unchanged without reading it: size, mtime (ns), inode, ctime (ns);
    for a folder, a digest of its files' listing with theirs. None when it does not exist."""
    from merv.digests import stat_key, tree_files

    try:
        if path.is_dir():
            listing = [[p.relative_to(path).as_posix(), *stat_key(p.stat())] for p in tree_files(path)]
            return ["dir", hashlib.sha256(json.dumps(listing).encode()).hexdigest()]
        return stat_key(path.stat())
    except OSError:
        return None


def media_sha256(path: Path) -> str:
    """The content digest of a media file or frame folder; a marker for one that cannot be read (which an item's
    digest then carries, so the item is redone once the file is there)."""
    from merv.digests import DigestMemo, sha256_file

    try:
        return DigestMemo(None).tree(path) if path.is_dir() else sha256_file(path)
    except OSError as e:
        return f"unreadable: {e.strerror or type(e).__name__}"


def record_digest(item: Item) -> str:
    """The digest of everything about an item but its media bytes."""
    text = {"key": item.key, "modality": item.modality, "media": None if item.media is None else str(item.media),
            "record": item.record, "time": item.time, "end_frame": item.end_frame,
            "folder_fps": item.folder_fps}  # fmt: skip
    return hashlib.sha256(json.dumps(text, sort_keys=True, default=str).encode()).hexdigest()


def item_digest(record: str, media_sha: str | None) -> str:
    return hashlib.sha256(f"{record}:{media_sha or '-'}".encode()).hexdigest()


def media_info(item: Item) -> dict | None:
    """``{"path", "stat", "sha256"}`` of an item's media (None for text); the stat is taken before reading."""
    if item.media is None:
        return None
    stat = media_stat(item.media)
    return {"path": str(item.media), "stat": stat, "sha256": media_sha256(item.media) if stat else "missing"}


def encode_with_media(item: Item, settings: ShardSettings) -> tuple[dict[str, bytes] | None, str | None, dict | None]:
    """:func:`encode_item` plus the media's :func:`media_info` (hashed first: decoding then reads from the cache)."""
    media = media_info(item)
    return (*encode_item(item, settings), media)


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def combine_digests(parts: list[tuple[str, dict]], counts) -> dict[str, str]:
    """Per frame count, one digest over named parts in order (a part without that count, e.g. a text-only sample,
    still counts by its name): the sample digests of a shard, or the shard digests of a folder."""
    return {str(c): _digest(f"{name}:{d.get(str(c), '-')}".encode() for name, d in parts) for c in counts}
