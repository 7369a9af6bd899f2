"""The training loader: WebDataset shards -> padded batches, split by rank and worker, resumable mid-epoch.

Per epoch the shard list is shuffled with ``seed + epoch`` and read as one sequence of samples, which is cut into
``world_size`` equal contiguous ranges, one a rank, and each rank's range into near-equal ranges, one a DataLoader
worker (:func:`split_ranges`). A range may start or end inside a shard: the samples before it are read past as tar
bytes, never decoded. A worker shuffles its samples in a buffer seeded by (seed, epoch, rank, worker).

Every rank holds the same number of samples, so every rank yields the same number of batches in an epoch
(:meth:`ShardLoader.batches_per_epoch`) whatever the shard sizes: a rank never runs into the next epoch while
another is still in this one. At most ``world_size - 1`` samples (the remainder) sit out an epoch; the next epoch's
shuffle leaves out others.

A position is ``(epoch, batches consumed in it)``, the same on every rank: resuming there skips each worker's
consumed samples as raw tar bytes, before any JPEG decoding, and yields exactly the batches an uninterrupted run
would have yielded next.

The global random generators a transform might draw from (``random``, NumPy, torch) are seeded in every worker from
(seed, epoch, rank, worker) (:func:`worker_seed`), never from the parent's RNG state, so such draws repeat run after
run as the sample order does. The order itself depends on the worker count: it is part of a run's config.
"""

from __future__ import annotations

import itertools
import random
import tarfile
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from merv.config import fingerprint
from merv.data.reader import decode_sample, read_manifest


@dataclass(frozen=True)
class Position:
    """Where a loader is: ``batches`` batches of ``epoch`` have been consumed."""

    epoch: int = 0
    batches: int = 0


def worker_order(per_worker: list[int]) -> list[int]:
    """The worker of each batch of an epoch, in the order of an uninterrupted run: one batch per worker in turn,
    a worker leaving the cycle once it is exhausted (what a DataLoader does)."""
    order = []
    for turn in range(max(per_worker, default=0)):
        order += [w for w, n in enumerate(per_worker) if n > turn]
    return order


@dataclass(frozen=True)
class Piece:
    """Samples ``[first, first + count)`` of one shard (``shard``: its manifest entry)."""

    shard: dict
    first: int
    count: int


def split_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """``[0, total)`` cut into ``parts`` contiguous ``(start, end)`` ranges whose lengths differ by at most one (the
    longer ones first)."""
    q, r = divmod(total, parts)
    bounds = [i * q + min(i, r) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def pieces(shards: list[dict], start: int, end: int) -> list[Piece]:
    """The samples ``[start, end)`` of ``shards`` read as one sequence, as per-shard pieces in order."""
    out, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(end, offset + shard["samples"])
        if lo < hi:
            out.append(Piece(shard, lo - offset, hi - lo))
        offset += shard["samples"]
    return out


def worker_seed(seed: int, epoch: int, rank: int, worker: int = 0) -> int:
    """The 63-bit seed of one DataLoader worker's (or, for ``worker=-1``, one epoch's) global RNGs."""
    return int(fingerprint(["loader", seed, epoch, rank, worker]), 16) & (2**63 - 1)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and NumPy from the seed torch gave this worker (itself from the epoch's
    generator, so a function of seed, epoch, rank and worker)."""
    import numpy as np

    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)


class ShardLoader:
    def __init__(
        self,
        shard_dir: str | Path,
        transform: Callable[[dict], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        *,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        feature_sets: tuple = (),
        frames: bool = True,
        pin_memory: bool = False,
        prefetch: int = 2,
    ):
        """``feature_sets``: opened feature caches (:class:`merv.features.cache.FeatureSet`) whose features join each
        sample; ``frames=False``: no encoder runs on the fly, so the video shards are not read at all (the first
        cache, which also holds every sample's record, leads)."""
        if not frames and not feature_sets:
            raise ValueError("a loader without frames needs at least one feature cache")
        self.feature_sets = list(feature_sets)
        lead = self.feature_sets.pop(0) if not frames else None
        self.shard_dir = Path(lead.folder) if lead else Path(shard_dir)
        self.manifest = lead.manifest if lead else read_manifest(self.shard_dir)
        self.lead = lead
        self.transform, self.collate = transform, collate
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.pin_memory, self.prefetch = pin_memory, prefetch
        starts = itertools.accumulate((s["samples"] for s in self.manifest["shards"]), initial=0)
        self.first = {s["name"]: start for s, start in zip(self.manifest["shards"], starts, strict=False)}
        self.shards = [s for s in self.manifest["shards"] if s["samples"]]
        self.samples_per_rank = sum(s["samples"] for s in self.shards) // world_size
        if self.samples_per_rank < max(1, num_workers):
            raise ValueError(
                f"{shard_dir}: {sum(s['samples'] for s in self.shards)} samples cannot feed {world_size} ranks x "
                f"{max(1, num_workers)} workers"
            )

    def opened_caches(self) -> list:
        """The feature caches this loader reads (the leading one first)."""
        return ([self.lead] if self.lead else []) + self.feature_sets

    # -- the split ------------------------------------------------------------------------------------------------
    def pieces_by_worker(self, epoch: int, rank: int | None = None) -> list[list[Piece]]:
        """The pieces of shards each DataLoader worker of ``rank`` reads in ``epoch``."""
        shards = list(self.shards)
        random.Random(self.seed + epoch).shuffle(shards)
        first = (self.rank if rank is None else rank) * self.samples_per_rank
        return [
            pieces(shards, first + lo, first + hi)
            for lo, hi in split_ranges(self.samples_per_rank, max(1, self.num_workers))
        ]

    def batches_per_worker(self, epoch: int = 0) -> list[int]:
        """The same on every rank and in every epoch: ranks and workers hold fixed sample counts."""
        return [
            -(-(hi - lo) // self.batch_size) for lo, hi in split_ranges(self.samples_per_rank, max(1, self.num_workers))
        ]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Batches every rank yields in an epoch."""
        return sum(self.batches_per_worker(epoch))

    # -- iteration ------------------------------------------------------------------------------------------------
    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        """Batches of ``epoch`` from batch number ``start_batch`` on."""
        order = worker_order(self.batches_per_worker(epoch))
        skips = [order[:start_batch].count(w) for w in range(max(1, self.num_workers))]
        dataset = _EpochDataset(self, epoch, skips)
        tagged = (
            iter(dataset)
            if self.num_workers == 0
            else iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    persistent_workers=False,
                    pin_memory=self.pin_memory,
                    prefetch_factor=self.prefetch,
                    # worker w's torch seed is this generator's first draw + w: no draw from the global RNG
                    generator=torch.Generator().manual_seed(worker_seed(self.seed, epoch, self.rank, -1)),
                    worker_init_fn=seed_worker,
                )
            )
        )
        # A resumed DataLoader starts its cycle at worker 0 whoever's turn it is: re-emit in the uninterrupted order.
        waiting: dict[int, deque] = defaultdict(deque)
        for w in order[start_batch:]:
            while not waiting[w]:
                worker, batch = next(tagged)
                waiting[worker].append(batch)
            yield waiting[w].popleft()

    def __call__(self, position: Position = Position()) -> Iterator[tuple[Position, dict]]:
        """Endless batches from ``position``, each with the position after it."""
        for epoch in itertools.count(position.epoch):
            start = position.batches if epoch == position.epoch else 0
            for i, batch in enumerate(self.epoch(epoch, start), start=start + 1):
                yield Position(epoch, i), batch


class _EpochDataset(IterableDataset):
    def __init__(self, loader: ShardLoader, epoch: int, skips: list[int]):
        super().__init__()
        self.loader, self.epoch, self.skips = loader, epoch, skips

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = get_worker_info()
        worker = info.id if info is not None else 0
        ld = self.loader
        raw = (
            sample
            for piece in ld.pieces_by_worker(self.epoch)[worker]
            for sample in _with_features(ld, piece, _read(ld.shard_dir / piece.shard["name"], piece.first, piece.count))
        )
        if ld.shuffle_buffer:
            rng = random.Random(f"{ld.seed}-{self.epoch}-{ld.rank}-{worker}")
            raw = wds.shuffle(ld.shuffle_buffer, initial=ld.shuffle_buffer, rng=rng)(raw)
        samples = itertools.islice(raw, self.skips[worker] * ld.batch_size, None)  # skipped: never decoded
        batch = []
        for sample in samples:
            batch.append(ld.transform(_decode(ld, sample)))
            if len(batch) == ld.batch_size:
                yield worker, ld.collate(batch)
                batch = []
        if batch:
            yield worker, ld.collate(batch)


def _read(url: Path, first: int = 0, count: int | None = None) -> Iterator[dict]:
    """Undecoded samples of one tar, from sample ``first`` on (earlier ones are read past as bytes, never decoded)."""
    import webdataset as wds

    stream = wds.DataPipeline(wds.SimpleShardList([str(url)]), wds.tarfile_to_samples())
    try:
        yield from itertools.islice(stream, first, None if count is None else first + count)
    except (OSError, tarfile.TarError, ValueError) as e:
        raise ValueError(f"{url}: cannot read this shard ({type(e).__name__}: {e})") from None


def _cache_range(feature_set, first: int, count: int) -> Iterator[dict]:
    """Samples ``[first, first + count)`` of a feature cache in the global sample order, whatever its shard
    boundaries (a cache made before a reshard that left this encoder's frames alone still lines up)."""
    start = 0
    for shard in feature_set.manifest["shards"]:
        end = start + shard["samples"]
        if end > first and start < first + count:
            skip = max(first, start) - start
            yield from _read(feature_set.folder / shard["name"], skip, min(first + count, end) - start - skip)
        start = end


def _with_features(ld: ShardLoader, piece: Piece, lead: Iterator[dict]) -> Iterator[dict]:
    """The lead shard's samples with every other cache's feature members joined in, checked key by key."""
    start = ld.first[piece.shard["name"]] + piece.first
    others = [_cache_range(fs, start, piece.count) for fs in ld.feature_sets]
    for sample, *joined in itertools.zip_longest(lead, *others):
        for fs, extra in zip(ld.feature_sets, joined, strict=True):
            if sample is None or extra is None or extra["__key__"] != sample["__key__"]:
                where = ld.shard_dir / piece.shard["name"]
                raise fs.misaligned(where, (sample or {}).get("__key__"), (extra or {}).get("__key__"))
            name = fs.member
            if name in extra:
                sample[name], sample[f"{name}.__url__"] = extra[name], extra["__url__"]
        yield sample


def _decode(ld: ShardLoader, raw: dict) -> dict:
    """A raw sample -> ``{"frames", "meta", "features": {encoder: tensor}}`` (features verified by digest)."""
    sample = decode_sample(raw)
    sources = ([ld.lead] if ld.lead else []) + ld.feature_sets
    sample["features"] = {}
    for fs in sources:
        value = fs.decode(raw)
        if value is not None:
            sample["features"][fs.encoder] = value
    return sample

