"""Sharding: training JSON, eval_data benchmarks or folders of videos -> WebDataset tars of pre-sampled frames.

Each sample is decoded once: the union of every configured frame count's uniform samples inside its clip window,
with the short side at the largest encoder size and the aspect ratio kept, stored as JPEG (or lossless ``.npy``)
members next to a ``json`` record (key, modality, source, frame positions per count, conversation or question).
Text-only training samples (no video, no image) are samples too: only their ``json`` record. Shards are filled to a
target size, written under a temporary name and renamed; a ``shard-NNNNNN.json`` index beside each tar is its commit
marker, so an interrupted or extended run redoes only the missing work and ends with the same bytes as an
uninterrupted one. Bad items are skipped and listed in ``quarantine.jsonl``; ``manifest.json`` sums it all up.

Shards already written are matched to the items by content, not by id: each shard index records every item's digest
-- its record (text, answer, clip window, media path) and its media file's SHA-256 -- and the media file's size,
mtime, inode and ctime, so an unchanged file is never read again and a changed one is hashed to find out whether its
bytes changed. A rerun keeps the leading shards whose items are all unchanged, copies the samples of other unchanged
items from the old shards, and decodes only new and changed items (a mended video leaves the quarantine).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from merv.config import fingerprint
from merv.data.video import BACKENDS, DEFAULT_BACKEND, FOLDER_FPS, IMAGE_EXTENSIONS, VideoError, read_frames

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif"}
SHARD_PATTERN = "shard-{:06d}"


Modality = Literal["video", "image", "text"]
MODALITIES: tuple[str, ...] = get_args(Modality)


@dataclass(frozen=True)
class Item:
    """One thing to shard: a media path (video, image or frame folder) and the text that goes with it, or text
    alone (``media`` None: a text-only conversation)."""

    key: str
    media: Path | None
    record: dict = field(default_factory=dict)  # conversation (training) or question + answer (evaluation)
    time: tuple[float, float] | None = None  # clip window in seconds
    end_frame: int | None = None
    modality: Modality = "video"
    folder_fps: float = FOLDER_FPS  # frames a second of a folder of frames (VLEP's: 3)

    def __post_init__(self):
        if (self.media is None) != (self.modality == "text"):
            raise ValueError(f"item {self.key!r}: modality {self.modality!r} with media {self.media}")


@dataclass(frozen=True)
class ShardSettings:
    """Everything that determines the bytes of the shards (its fingerprint tags each shard)."""

    frame_counts: tuple[int, ...]
    size: int  # of the short side: frames keep their aspect ratio (encoder transforms crop or squash at load time)
    target_bytes: int = 200 * 2**20
    frame_format: Literal["jpg", "npy"] = "jpg"
    jpeg_quality: int = 95
    backend: str = DEFAULT_BACKEND
    resize: Literal["short_side"] = "short_side"  # stored frame geometry; earlier shards were squashed squares
    digests: int = 1  # samples record a digest of their frames per frame count (feature caches are keyed by them)

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

    def fingerprint(self) -> str:
        return fingerprint(asdict(self))


class DataFormatError(ValueError):
    """An input file that is not in the format it claims to be."""


# ------------------------------------------------------------------------------------------------------------------
# Inputs


def _safe_key(text: str) -> str:
    # WebDataset splits member names at the first dot: keys stay dot-free and path-safe.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _load_json_list(path: Path) -> list:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


def _training_media(sample: dict, where: str) -> tuple[str | None, Modality]:
    """The media path of a training sample and its modality; a sample with neither key is text-only (as in
    LLaVA-665k and Video-LLaVA's stage-2 data)."""
    kind = "video" if "video" in sample else "image" if "image" in sample else None
    if kind is None:
        return None, "text"
    media = sample[kind]
    if isinstance(media, list):
        raise DataFormatError(f"{where}: {kind!r} is a list; one media path per sample is supported")
    if not isinstance(media, str) or not media.strip():
        raise DataFormatError(f"{where}: {kind!r} must be a non-empty path, got {media!r}")
    return media, kind


def training_items(json_path: Path, root: Path | None = None) -> list[Item]:
    """Items of a Video-LLaVA training JSON (video, image and text-only samples); media paths resolve against
    ``root`` (default: the JSON's folder)."""
    root = root or json_path.parent
    items = []
    for i, sample in enumerate(_load_json_list(json_path)):
        where = f"{json_path} sample {i}"
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise DataFormatError(f"{where}: expected an object with a 'conversations' list")
        media, modality = _training_media(sample, f"{where} (id {sample.get('id')!r})")
        key = _safe_key(str(sample.get("id", i)))
        record = {"id": sample.get("id", i), "conversations": sample["conversations"]}
        items.append(Item(key, None if media is None else root / media, record, modality=modality))
    return items


def benchmark_items(bench_dir: Path) -> list[Item]:
    """Items of a MERV ``eval_data/<benchmark>`` folder: ``test_q.json`` joined with ``test_a.json`` on
    ``question_id``; videos are ``videos/<video_name>.<ext>`` or folders of frames ``videos/<video_name>/``, at the
    frame rate the benchmark registry gives the folder's name (VLEP: 3 fps, as the original reads them)."""
    from merv.eval.registry import lookup  # the benchmarks' layout facts are data in one table

    questions = _load_json_list(bench_dir / "test_q.json")
    answers = {a["question_id"]: a for a in _load_json_list(bench_dir / "test_a.json")}
    video_dir = bench_dir / "videos"
    videos = {p.stem if p.is_file() else p.name: p for p in video_dir.iterdir()} if video_dir.is_dir() else {}
    folder_fps = lookup(bench_dir.name, questions[0] if questions else {}).folder_fps
    items = []
    for i, q in enumerate(questions):
        qid = q.get("question_id") if isinstance(q, dict) else None
        if qid is None or "video_name" not in q or "question" not in q:
            raise DataFormatError(f"{bench_dir}/test_q.json entry {i}: needs question_id, video_name and question")
        if qid not in answers:
            raise DataFormatError(f"{bench_dir}/test_q.json: question {qid!r} has no answer in test_a.json")
        name = str(q["video_name"])
        record = {**q, "answer": answers[qid]["answer"], "kind": "mcq" if "options" in q else "open"}
        if "answer_id" in answers[qid]:
            record["answer_id"] = answers[qid]["answer_id"]
        window = tuple(q["time"]) if q.get("time") is not None else None
        end_frame = q.get("end_frame")
        media = videos.get(name, video_dir / f"{name}.mp4")
        items.append(Item(_safe_key(str(qid)), media, record, window, end_frame, folder_fps=folder_fps))
    return items


def folder_items(folder: Path) -> list[Item]:
    """Every video or image below ``folder`` (sorted by relative path), with no text."""
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
    )
    if not paths:
        raise DataFormatError(f"{folder}: no video or image files found")
    return [
        Item(
            _safe_key(str(p.relative_to(folder).with_suffix(""))),
            p,
            {"source": str(p)},
            modality="image" if p.suffix.lower() in IMAGE_EXTENSIONS else "video",
        )
        for p in paths
    ]


def collect_items(sources: Path | list[Path], root: Path | None = None) -> list[Item]:
    """Items of one or more inputs (training JSON, benchmark folder, folder of videos), keys checked unique."""
    items = []
    for source in [sources] if isinstance(sources, Path) else sources:
        source = Path(source)
        if source.suffix == ".json" and not source.is_dir():
            items += training_items(source, root)
        elif source.is_dir() and (source / "test_q.json").is_file():
            items += benchmark_items(source)
        elif source.is_dir():
            items += folder_items(source)
        else:
            raise DataFormatError(f"{source}: not a training JSON, an eval_data benchmark folder or a folder of videos")
    duplicates = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if duplicates:
        raise DataFormatError(f"duplicate sample keys (ids) across the inputs, e.g. {duplicates[:5]}")
    return items


# ------------------------------------------------------------------------------------------------------------------
# Encoding (runs in worker processes)


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


# ------------------------------------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # same input and settings -> same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


class _Shard:
    """The shard being filled; ``commit`` renames the tar into place, then writes its index (the commit marker)."""

    def __init__(self, out: Path, number: int, fingerprint_: str, counts: tuple[int, ...]):
        self.out, self.name, self.fingerprint, self.counts = out, SHARD_PATTERN.format(number), fingerprint_, counts
        self.tmp = out / f"{self.name}.tar.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []
        self.bad: list[dict] = []
        self.samples = 0
        self.modalities: Counter[str] = Counter()
        self.frame_digests: list[tuple[str, dict]] = []  # (key, {count: digest}) of the good samples, in order
        self.items: list[dict] = []  # per key: its content digest and its media's stat and digest

    def add(self, item: Item, members: dict[str, bytes] | None, reason: str | None, content: dict) -> None:
        self.keys.append(item.key)
        self.items.append(content)
        if members is None:
            self.bad.append({"key": item.key, "source": str(item.media), "reason": reason})
            return
        for ext, payload in members.items():
            _add_member(self.tar, f"{item.key}.{ext}", payload)
        self.samples += 1
        self.modalities[item.modality] += 1
        self.frame_digests.append((item.key, json.loads(members["json"]).get("frame_digests", {})))

    @property
    def bytes(self) -> int:
        return self.tar.fileobj.tell()

    def commit(self) -> dict:
        self.tar.close()
        final = self.out / f"{self.name}.tar"
        self.tmp.replace(final)
        index = {
            "name": final.name,
            "fingerprint": self.fingerprint,
            "keys": self.keys,
            "samples": self.samples,
            "modalities": dict(sorted(self.modalities.items())),
            "frame_digests": combine_digests(self.frame_digests, self.counts),
            "items": self.items,
            "bad": self.bad,
            "bytes": final.stat().st_size,
            "sha256": _sha256(final),
        }
        tmp = self.out / f"{self.name}.json.tmp"
        tmp.write_text(json.dumps(index))
        tmp.replace(self.out / f"{self.name}.json")
        return index


def combine_digests(parts: list[tuple[str, dict]], counts) -> dict[str, str]:
    """Per frame count, one digest over named parts in order (a part without that count, e.g. a text-only sample,
    still counts by its name): the sample digests of a shard, or the shard digests of a folder."""
    return {str(c): _digest(f"{name}:{d.get(str(c), '-')}".encode() for name, d in parts) for c in counts}


def shard_keys(shard_dir: Path, name: str) -> list[str]:
    """The keys of the samples in one shard (bad items excluded), in order, from its index."""
    index = json.loads((Path(shard_dir) / f"{name.removesuffix('.tar')}.json").read_text())
    bad = {b["key"] for b in index["bad"]}
    return [k for k in index["keys"] if k not in bad]


def sample_keys(shard_dir: Path) -> list[str]:
    """Every sample's key, in the shard folder's order."""
    return [k for s in read_manifest(shard_dir)["shards"] for k in shard_keys(shard_dir, s["name"])]


REUSE = ".reuse"  # shards of an earlier run whose samples may be copied; removed when the run completes


class _OldShard:
    """A shard written earlier (its index and tar), whose samples can be copied without decoding again."""

    def __init__(self, index: dict, tar: Path, index_path: Path):
        self.index, self.tar, self.index_path = index, tar, index_path
        self._members: dict[str, list[tuple[str, int, int]]] | None = None

    def members(self, key: str) -> dict[str, bytes]:
        if self._members is None:  # the headers only: tarfile seeks past the data
            self._members = {}
            with tarfile.open(self.tar, "r") as tar:
                for m in tar:
                    k, ext = m.name.split(".", 1)  # keys are dot-free (see _safe_key)
                    self._members.setdefault(k, []).append((ext, m.offset_data, m.size))
        out = {}
        with open(self.tar, "rb") as f:
            for ext, offset, size in self._members.get(key, []):
                f.seek(offset)
                out[ext] = f.read(size)
        return out


def _read_old(index_path: Path, tar_path: Path, fingerprint_: str) -> _OldShard | None:
    """An earlier shard usable for this run (same settings, tar intact as its index says), else None."""
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (
        index.get("fingerprint") != fingerprint_
        or not isinstance(index.get("items"), list)  # written before items were matched by content: redo it
        or len(index["items"]) != len(index.get("keys", []))
        or not tar_path.is_file()
        or tar_path.stat().st_size != index.get("bytes")
    ):
        return None
    return _OldShard(index, tar_path, index_path)


def _earlier_shards(out: Path, fingerprint_: str) -> tuple[list[_OldShard], list[_OldShard]]:
    """``(numbered, stashed)``: the leading run of intact shards in ``out`` (in order), and every other usable one
    (later shards of ``out`` and those stashed in ``out/.reuse`` by an interrupted run)."""
    numbered, stashed = [], []
    n = 0
    while (out / f"{SHARD_PATTERN.format(n)}.json").is_file():
        name = SHARD_PATTERN.format(n)
        old = _read_old(out / f"{name}.json", out / f"{name}.tar", fingerprint_)
        if old is None:
            break
        numbered.append(old)
        n += 1
    rest = sorted(p for p in out.glob("shard-*.json") if p.stem >= SHARD_PATTERN.format(n))
    rest += sorted((out / REUSE).glob("*.json"))
    for index_path in rest:
        old = _read_old(index_path, index_path.with_suffix(".tar"), fingerprint_)
        if old is not None:
            stashed.append(old)
    return numbered, stashed


def _content(items: list[Item], earlier: list[_OldShard], pool) -> tuple[list[str | None], list[dict | None]]:
    """Each item's content digest and media info where it can be known without decoding: from an earlier shard's
    record when the media's stat is unchanged, else by hashing the media (only for items an earlier shard holds,
    in the worker pool when there is one); None where no earlier shard holds the key (the item is decoded anyway)."""
    known = {e["key"]: e for old in earlier for e in old.index["items"]}
    digests: list[str | None] = [None] * len(items)
    medias: list[dict | None] = [None] * len(items)
    to_hash = []
    for i, item in enumerate(items):
        record = record_digest(item)
        if item.media is None:
            digests[i] = item_digest(record, None)
            continue
        prev = (known.get(item.key) or {}).get("media")
        if prev is None:
            continue
        stat = media_stat(item.media)
        if prev.get("path") == str(item.media) and stat is not None and prev.get("stat") == stat:
            medias[i] = prev
            digests[i] = item_digest(record, prev["sha256"])
        else:
            to_hash.append(i)
    hashed = (pool.map(media_info, [items[i] for i in to_hash]) if pool is not None
              else map(media_info, (items[i] for i in to_hash)))  # fmt: skip
    for i, media in zip(to_hash, hashed, strict=True):
        medias[i] = media
        digests[i] = item_digest(record_digest(items[i]), media["sha256"])
    return digests, medias


def _keep_prefix(out: Path, numbered: list[_OldShard], digests: list[str | None], medias) -> list[_OldShard]:
    """The leading shards whose items are exactly the next items, unchanged; their indexes get the current stats."""
    kept, pos = [], 0
    for old in numbered:
        entries = old.index["items"]
        n = len(entries)
        if n == 0 or pos + n > len(digests) or [e["digest"] for e in entries] != digests[pos : pos + n]:
            break
        fresh = [{**e, "media": medias[pos + j] if medias[pos + j] is not None else e["media"]}
                 for j, e in enumerate(entries)]  # fmt: skip
        if fresh != entries:  # moved or touched, same bytes: remember the new stats
            old.index["items"] = fresh
            tmp = old.index_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(old.index))
            tmp.replace(old.index_path)
        kept.append(old)
        pos += n
    return kept


def _stash(out: Path, shards: list[_OldShard]) -> list[_OldShard]:
    """Move shards that will not be kept out of the way of the new ones (``out/.reuse/<sha256>``), and delete every
    other stray shard file; returns the stashed shards, whose samples may still be copied."""
    (out / REUSE).mkdir(exist_ok=True)
    moved = []
    for old in shards:
        if old.tar.parent == out / REUSE:
            moved.append(old)
            continue
        stem = out / REUSE / old.index["sha256"]
        old.tar.replace(stem.with_suffix(".tar"))
        old.index_path.replace(stem.with_suffix(".json"))
        moved.append(_OldShard(old.index, stem.with_suffix(".tar"), stem.with_suffix(".json")))
    return moved


def _clear_stale(out: Path, kept: list[_OldShard]) -> None:
    keep = {f"{k.index['name'][:-4]}{ext}" for k in kept for ext in (".tar", ".json")}
    for stale in list(out.glob("shard-*")):
        if stale.name not in keep:
            stale.unlink()


@dataclass
class ShardSummary:
    input: int
    good: int
    bad: int
    by_reason: dict[str, int]
    by_modality: dict[str, int]
    shards: int
    resumed_items: int  # in the leading shards kept as they were
    seconds: float
    reused_items: int = 0  # copied from earlier shards without decoding
    encoded_keys: list[str] = field(default_factory=list)  # decoded by this run (new or changed items)

    def line(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.by_reason.items())) or "none"
        kinds = ", ".join(f"{m} {self.by_modality[m]}" for m in MODALITIES if self.by_modality.get(m))
        return (
            f"{self.input} items: {self.good} good, {self.bad} bad ({reasons}) in {self.shards} shards "
            f"(good by modality: {kinds or 'none'}); {self.resumed_items} items were already sharded; "
            f"{self.reused_items} copied unchanged from earlier shards, {len(self.encoded_keys)} decoded; "
            f"{self.seconds:.1f}s"
        )


def reason_kind(reason: str) -> str:
    """The short class of a quarantine reason (``'decoding failed (...)'`` -> ``'decoding failed'``)."""
    return reason.split(" (")[0]


def write_shards(
    items: list[Item],
    out: Path,
    settings: ShardSettings,
    *,
    workers: int = 1,
    strict: bool = False,
    progress: bool = False,
) -> ShardSummary:
    """Shard ``items`` into ``out`` (reusing by content what a previous run with the same settings left, see the
    module docstring), write ``quarantine.jsonl`` and ``manifest.json``. With ``strict`` the first bad item raises
    :class:`VideoError`."""
    import shutil

    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    fp = settings.fingerprint()
    for leftover in out.glob("*.tmp"):
        leftover.unlink()
    pool = None
    if workers > 1:
        _preload(settings)
        pool = ProcessPoolExecutor(workers, initializer=_init_worker)
    shard = None
    bar = None
    try:
        numbered, stashed = _earlier_shards(out, fp)
        digests, medias = _content(items, numbered + stashed, pool)
        kept = _keep_prefix(out, numbered, digests, medias)
        old = _stash(out, [o for o in numbered if o not in kept] + stashed)
        _clear_stale(out, kept)
        indexes = [k.index for k in kept]
        pos = sum(len(ix["keys"]) for ix in indexes)
        if pos:
            log.info("%s: resuming after %d items already in %d shards", out, pos, len(indexes))
        if strict:
            for ix in indexes:
                if ix["bad"]:
                    b = ix["bad"][0]
                    raise VideoError(b["source"], b["reason"])
        reusable = {e["digest"]: (o, e) for o in old for e in o.index["items"]}
        reasons = {b["key"]: b["reason"] for o in old for b in o.index["bad"]}

        todo = [
            (items[i], digests[i], reusable.get(digests[i]) if digests[i] else None) for i in range(pos, len(items))
        ]
        bar = tqdm(total=len(items), initial=pos, desc=f"shard {out.name}", disable=not progress, mininterval=2)
        reused, encoded = 0, []
        for (item, digest, hit), (members, reason, media) in zip(
            todo, _encoded(todo, reasons, settings, pool, workers), strict=True
        ):
            if members is None and strict:
                raise VideoError(item.media, reason)
            if hit is None:
                encoded.append(item.key)
                digest = item_digest(record_digest(item), media["sha256"] if media else None)
            else:
                reused += 1
            if shard is None:
                shard = _Shard(out, len(indexes), fp, settings.frame_counts)
            shard.add(item, members, reason, {"key": item.key, "digest": digest, "media": media})
            bar.update(1)
            if shard.bytes >= settings.target_bytes:
                indexes.append(shard.commit())
                shard = None
        if shard is not None:
            indexes.append(shard.commit())
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if shard is not None and not shard.tar.closed:
            shard.tar.close()
            shard.tmp.unlink(missing_ok=True)
    shutil.rmtree(out / REUSE, ignore_errors=True)  # every sample of the earlier shards is now where it belongs
    if encoded:
        shown = ", ".join(encoded[:10]) + (f" (and {len(encoded) - 10} more)" if len(encoded) > 10 else "")
        log.info("%s: decoded %d new or changed items: %s", out, len(encoded), shown)

    bad = [b for ix in indexes for b in ix["bad"]]
    by_modality = sum((Counter(ix["modalities"]) for ix in indexes), Counter())
    with open(out / "quarantine.jsonl.tmp", "w") as f:
        for b in bad:
            f.write(json.dumps(b) + "\n")
    (out / "quarantine.jsonl.tmp").replace(out / "quarantine.jsonl")
    summary = ShardSummary(
        input=len(items),
        good=sum(ix["samples"] for ix in indexes),
        bad=len(bad),
        by_reason=dict(Counter(reason_kind(b["reason"]) for b in bad)),
        by_modality={m: by_modality[m] for m in MODALITIES},
        shards=len(indexes),
        resumed_items=pos,
        seconds=round(time.time() - start, 2),
        reused_items=reused,
        encoded_keys=encoded,
    )
    assert summary.good + summary.bad == summary.input, "every input item is either sharded or quarantined"
    manifest = {
        "samples": summary.good,
        "input": summary.input,
        "bad": summary.bad,
        "by_reason": summary.by_reason,
        "by_modality": summary.by_modality,
        "text_only": summary.by_modality["text"],
        "shards": [{k: ix[k] for k in ("name", "samples", "bytes", "sha256", "frame_digests")} for ix in indexes],
        "frame_digests": combine_digests([(ix["name"], ix["frame_digests"]) for ix in indexes], settings.frame_counts),
        "settings": asdict(settings),
        "fingerprint": fp,
    }
    (out / "manifest.json.tmp").write_text(json.dumps(manifest, indent=1))
    (out / "manifest.json.tmp").replace(out / "manifest.json")
    return summary


def _preload(settings: ShardSettings) -> None:
    """Import the decoding libraries before the workers are forked, so that they share them instead of each
    importing them again (torch alone takes about 2 s and a few hundred MB in every worker)."""
    import importlib

    import torch  # noqa: F401 - resizing

    importlib.import_module({"decord": "decord", "pyav": "av"}[settings.backend])


def _init_worker() -> None:
    """One compute thread per worker process: the workers are the parallelism. Also a must: libgomp is not
    fork-safe, and a worker forked from a process that already ran a parallel torch op hangs in its own first
    parallel op (the float resize of earlier versions did, after an in-process run had resized in the parent)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _encoded(
    todo: list[tuple], reasons: dict[str, str], settings: ShardSettings, pool, workers: int
) -> Iterator[tuple]:
    """``(members, reason, media)`` per ``(item, digest, reuse)`` in input order: copied from an earlier shard when
    ``reuse`` is set (a bad item keeps its quarantine reason), else encoded, in the pool when there is one. A bounded
    window of work in flight keeps memory flat. Text-only items are encoded here: a process hop would cost more."""

    def start(entry):
        item, _, hit = entry
        if hit is not None:
            old, e = hit
            members = old.members(item.key) if item.key not in reasons else None
            return members or None, reasons.get(item.key), e["media"]
        if pool is None or item.media is None:
            return encode_with_media(item, settings)
        return pool.submit(encode_with_media, item, settings)

    if pool is None:
        for entry in todo:
            yield start(entry)
        return
    window = workers * 4
    pending: deque = deque()
    for entry in todo:
        pending.append(start(entry))
        if len(pending) >= window:
            yield _result(pending.popleft())
    while pending:
        yield _result(pending.popleft())


def _result(entry) -> tuple:
    return entry if isinstance(entry, tuple) else entry.result()


# ------------------------------------------------------------------------------------------------------------------
# Reading


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
