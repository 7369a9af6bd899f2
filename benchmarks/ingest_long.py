"""Ingest throughput (issues 3 and 13; benchmarks/ingest.py measures issue 22's short clips), as ratios from one run
on the same videos and cores:

1. `merv shard` throughput / the decode limit: a pass that only decodes the same frames with decord (opens each
   video, reads the sampled frames, nothing else), on two corpora:
   - long clips like the paper's training sets (Valley / Video-ChatGPT: tens of seconds of 360p-720p)  (goal >= 0.9)
   - short clips like WebVid-style corpora (millions of clips of a few seconds)                        (goal >= 0.7)
2. training-loader samples/s / per-sample decoding from the original mp4s (long clips)                (goal >= 5)
and, to pick the default decoder, merv's decoding with each backend (long clips).

    python benchmarks/ingest_long.py [--videos 16] [--seconds 20] [--width 640] [--height 360] [--workers 2]
                                [--short-videos 480] [--short-seconds 8] [--short-width 320] [--short-height 240]
                                [--rounds 2]

The videos are generated here (H.264, 30 fps, textured background with moving shapes, x264's default keyframe
interval). Frames are sampled for two encoders (16 and 8 frames) at 224 px, as merv-full's encoders take. `merv
shard` is timed as the function it runs (`write_shards`, JPEG frames, its own worker pool), without the command's
one-off start-up (Python and imports, about 3 s). Shard passes alternate with decode-only passes (`--rounds`) and the
ratio compares their mean times, so that load from other processes drifting during the run biases neither side.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from merv.data.loader import ShardLoader
from merv.data.shards import Item, ShardSettings, write_shards
from merv.data.video import BACKENDS, read_frames, sample_frame_indices

COUNTS = (16, 8)
SIZE = 224


def make_video(path: Path, seconds: int, width: int, height: int, seed: int) -> None:
    import av

    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, (height, width + 400, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for t in range(seconds * 30):
            frame = texture[:, t % 400 : t % 400 + width].copy()
            x, y = (37 * t) % (width - 60), (23 * t) % (height - 60)
            frame[y : y + 60, x : x + 60] = (255 * (t % 2), 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def to_model_inputs(frames: np.ndarray, positions: dict) -> dict[str, torch.Tensor]:
    """What a training sample costs after decoding: each encoder's frames as normalised float tensors."""
    out = {}
    for count, pos in positions.items():
        x = torch.from_numpy(frames[pos]).permute(0, 3, 1, 2).float().div_(255)
        out[str(count)] = (x - 0.5) / 0.5
    return out


def decode_only(path: Path, backend: str) -> int:
    """merv's decoding interface with one backend (rotation check, sampling, resize)."""
    frames, _ = read_frames(path, list(COUNTS), SIZE, backend=backend)
    return len(frames)


def decode_limit(path: Path) -> int:
    """The least a sharder must do: open the video with decord and decode the sampled frames."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    n = len(reader)
    union = sorted({i for count in COUNTS for i in sample_frame_indices(n, count)})
    return len(reader.get_batch(union).asnumpy())


def make_corpus(folder: Path, n: int, seconds: int, width: int, height: int, pool) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"v{i:04d}.mp4" for i in range(n)]
    list(pool.map(make_video, paths, [seconds] * n, [width] * n, [height] * n, range(n)))
    return paths


def shard_vs_limit(name: str, paths: list[Path], out: Path, workers: int, pool, rounds: int) -> float:
    """Print videos/s of `merv shard` and of the decode limit on ``paths``, alternating (limit, then ``rounds`` x
    (shard, limit)) so that load from other processes hits both alike; returns the ratio of their mean times.
    ``out / "round0"`` keeps the first round's shards."""
    list(pool.map(decode_limit, paths[:workers]))  # warm the workers
    items = [Item(pth.stem, pth, {}) for pth in paths]
    settings = ShardSettings(frame_counts=COUNTS, size=SIZE, target_bytes=2 * 2**20)
    limit_s = [timed(lambda: list(pool.map(decode_limit, paths)))]
    shard_s = []
    for r in range(rounds):
        shard_s.append(timed(lambda r=r: write_shards(items, out / f"round{r}", settings, workers=workers)))
        limit_s.append(timed(lambda: list(pool.map(decode_limit, paths))))

    def rates(times):
        return " ".join(f"{len(paths) / t:.2f}" for t in times)

    print(f"{name}: decode limit {rates(limit_s)} videos/s; merv shard {rates(shard_s)} videos/s (in run order)")
    return float(np.mean(limit_s) / np.mean(shard_s))


class Mp4Dataset(Dataset):
    """The original MERV way: every sample decodes its mp4 again, once per encoder."""

    def __init__(self, paths, backend):
        self.paths, self.backend = paths, backend

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        out = {}
        for count in COUNTS:
            frames, pos = read_frames(self.paths[i], [count], SIZE, backend=self.backend)
            out.update(to_model_inputs(frames, pos))
        return out


def shard_sample(sample: dict) -> dict:
    positions = {int(c): p for c, p in sample["meta"]["frame_positions"].items()}
    return to_model_inputs(sample["frames"], positions)


def first(batch):
    return batch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="loader epochs over the shards")
    p.add_argument("--short-videos", type=int, default=480, help="short-clip corpus size (0: skip it)")
    p.add_argument("--short-seconds", type=int, default=8)
    p.add_argument("--short-width", type=int, default=320)
    p.add_argument("--short-height", type=int, default=240)
    p.add_argument("--rounds", type=int, default=2, help="shard passes per corpus, each followed by a decode pass")
    args = p.parse_args()
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="merv-ingest-"))
    try:
        with ProcessPoolExecutor(args.workers) as pool:
            gen = timed(lambda: make_corpus(tmp / "long", args.videos, args.seconds, args.width, args.height, pool))
            paths = sorted((tmp / "long").iterdir())
            print(
                f"long clips: {args.videos} videos of {args.seconds} s, {args.width}x{args.height} @30 fps "
                f"(generated in {gen:.0f} s); {args.workers} workers; frames {list(COUNTS)} at {SIZE} px"
            )
            ratios = {"long": shard_vs_limit("long clips", paths, tmp / "shards", args.workers, pool, args.rounds)}
            if args.short_videos:
                short = make_corpus(
                    tmp / "short", args.short_videos, args.short_seconds, args.short_width, args.short_height, pool
                )
                print(
                    f"short clips: {args.short_videos} videos of {args.short_seconds} s, "
                    f"{args.short_width}x{args.short_height} @30 fps"
                )
                ratios["short"] = shard_vs_limit(
                    "short clips", short, tmp / "short-shards", args.workers, pool, args.rounds
                )

            decode_s = {}
            list(pool.map(decode_only, paths[:2], ["decord"] * 2))  # warm the workers
            for backend in BACKENDS:
                decode_s[backend] = timed(lambda b=backend: list(pool.map(decode_only, paths, [b] * len(paths))))
        for backend, s in decode_s.items():
            print(f"merv decoding, {backend:6s}: {len(paths) / s:7.2f} videos/s (long clips)")
        best = min(decode_s, key=decode_s.get)

        loader = ShardLoader(
            tmp / "shards" / "round0", shard_sample, first, batch_size=4, shuffle_buffer=16, num_workers=args.workers
        )
        loader_s = timed(lambda: [list(loader.epoch(e)) for e in range(args.epochs)])
        loader_sps = args.epochs * len(paths) / loader_s
        mp4 = DataLoader(Mp4Dataset(paths, best), batch_size=4, num_workers=args.workers, collate_fn=first)
        mp4_s = timed(lambda: list(mp4))
        mp4_sps = len(paths) / mp4_s
        print(f"training loader from shards: {loader_sps:7.2f} samples/s; per-sample mp4 decoding: {mp4_sps:.2f}")

        print(f"RATIO merv shard / decode limit, long clips = {ratios['long']:.2f} (goal >= 0.9)")
        if "short" in ratios:
            print(f"RATIO merv shard / decode limit, short clips = {ratios['short']:.2f} (goal >= 0.7)")
        print(f"RATIO shard loader / per-sample mp4 decoding = {loader_sps / mp4_sps:.1f} (goal >= 5)")
        print(f"RATIO decode-only decord / pyav speed = {decode_s['pyav'] / decode_s['decord']:.2f} (default: {best})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
