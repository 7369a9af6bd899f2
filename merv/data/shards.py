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

The items come from :mod:`merv.data.items`, each is encoded by :mod:`merv.data.encoding`, and the folder is read by
:mod:`merv.data.reader`; their public names are importable from here too.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from merv.data.encoding import (  # noqa: F401 - re-exported: the sharding API in one place
    ShardSettings,
    combine_digests,
    encode_item,
    encode_with_media,
    item_digest,
    media_info,
    media_sha256,
    media_stat,
    record_digest,
)
from merv.data.items import (  # noqa: F401 - re-exported
    MODALITIES,
    VIDEO_EXTENSIONS,
    DataFormatError,
    Item,
    Modality,
    benchmark_items,
    collect_items,
    folder_items,
    training_items,
)
from merv.data.reader import decode_sample, iter_samples, read_manifest, sample_keys, shard_keys, shard_urls  # noqa: F401
from merv.data.video import VideoError
from merv.settings import ShardsSection

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:06d}"


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
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed by commit()
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
    strict: bool = ShardsSection.strict,
    progress: bool = False,
) -> ShardSummary:
    """Shard ``items`` into ``out`` (reusing by content what a previous run with the same settings left, see the
    module docstring), write ``quarantine.jsonl`` and ``manifest.json``. With ``strict`` the first bad item raises
    :class:`VideoError`; without, bad items are skipped and listed in ``quarantine.jsonl``. ``workers``: decoding
    processes (1: this one)."""
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
        pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(os.getpid(),))
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

    manifest = write_manifest(out, indexes, len(items), settings.record(), fp)
    summary = ShardSummary(
        input=manifest["input"],
        good=manifest["samples"],
        bad=manifest["bad"],
        by_reason=manifest["by_reason"],
        by_modality=manifest["by_modality"],
        shards=len(indexes),
        resumed_items=pos,
        seconds=round(time.time() - start, 2),
        reused_items=reused,
        encoded_keys=encoded,
    )
    return summary


def write_manifest(out: Path, indexes: list[dict], n_input: int, settings: dict, fp: str, **extra) -> dict:
    """Write ``quarantine.jsonl`` and ``manifest.json`` of a shard folder from its shards' indexes, in order (what
    :func:`write_shards` ends with, and what :func:`merv.data.parts.gather_parts` writes over the parts' shards);
    ``extra`` keys go into the manifest as they are. Returns the manifest."""
    bad = [b for ix in indexes for b in ix["bad"]]
    by_modality = sum((Counter(ix["modalities"]) for ix in indexes), Counter())
    with open(out / "quarantine.jsonl.tmp", "w") as f:
        for b in bad:
            f.write(json.dumps(b) + "\n")
    (out / "quarantine.jsonl.tmp").replace(out / "quarantine.jsonl")
    good = sum(ix["samples"] for ix in indexes)
    if good + len(bad) != n_input:
        raise ValueError(f"{out}: {good} samples and {len(bad)} quarantined items for {n_input} input items")
    by_modality = {m: by_modality[m] for m in MODALITIES}
    manifest = {
        "samples": good,
        "input": n_input,
        "bad": len(bad),
        "by_reason": dict(Counter(reason_kind(b["reason"]) for b in bad)),
        "by_modality": by_modality,
        "text_only": by_modality["text"],
        "shards": [{k: ix[k] for k in ("name", "samples", "bytes", "sha256", "frame_digests")} for ix in indexes],
        "frame_digests": combine_digests(
            [(ix["name"], ix["frame_digests"]) for ix in indexes], settings["frame_counts"]
        ),
        "settings": settings,
        "fingerprint": fp,
        **extra,
    }
    (out / "manifest.json.tmp").write_text(json.dumps(manifest, indent=1))
    (out / "manifest.json.tmp").replace(out / "manifest.json")
    return manifest


def _preload(settings: ShardSettings) -> None:
    """Import the decoding libraries before the workers are forked, so that they share them instead of each
    importing them again: the decoder, and torch (about 1.5 s of CPU) where frames are resized after decoding (each
    worker importing it on its first frame cost 2 s more CPU and wall in all, benchmarks/ingest.py). With
    ``scale_in_decoder`` the decoder gives frames at their stored size, and nothing imports torch (images and frame
    folders, still resized by torch, import it in the worker that meets one)."""
    import importlib

    importlib.import_module({"decord": "decord", "pyav": "av"}[settings.backend])
    if not settings.scale_in_decoder:
        import torch  # noqa: F401 - resizing


def _init_worker(parent: int) -> None:
    """One compute thread per worker process: the workers are the parallelism. Also a must: libgomp is not
    fork-safe, and a worker forked from a process that already ran a parallel torch op hangs in its own first
    parallel op (the float resize of earlier versions did, after an in-process run had resized in the parent).

    A worker dies with ``parent``: a killed ``merv shard`` (SIGKILL, a node's OOM killer) cannot shut its pool
    down, and its workers would otherwise wait on their queue forever. On Linux the kernel sends the signal."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent went before the request took effect
        os._exit(1)


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
