"""Ingest throughput (issue 3), as ratios from one run on the same videos and cores:

1. sharding throughput / a pass that only decodes the same frames            (goal >= 0.7)
2. training-loader samples/s / per-sample decoding from the original mp4s    (goal >= 5)
and, to pick the default decoder, the decode-only pass with each backend.

    python benchmarks/ingest.py [--videos 16] [--seconds 20] [--width 640] [--height 360] [--workers 2]

The videos are generated here (H.264, 30 fps, textured background with moving shapes, x264's default keyframe
interval), sized like the clips of the paper's training sets (Valley / Video-ChatGPT clips are tens of seconds of
360p-720p video). Frames are sampled for two encoders (16 and 8 frames) at 224 px, as merv-full's encoders take.
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
from merv.data.video import BACKENDS, read_frames

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
    frames, _ = read_frames(path, list(COUNTS), SIZE, backend=backend)
    return len(frames)


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
    args = p.parse_args()
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="merv-ingest-"))
    try:
        paths = [tmp / f"v{i:03d}.mp4" for i in range(args.videos)]
        gen = timed(lambda: [make_video(pth, args.seconds, args.width, args.height, i) for i, pth in enumerate(paths)])
        print(
            f"{args.videos} videos of {args.seconds} s, {args.width}x{args.height} @30 fps generated in {gen:.1f} s; "
            f"{args.workers} workers; frames {list(COUNTS)} at {SIZE} px"
        )

        decode_s = {}
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(decode_only, paths[:2], ["decord"] * 2))  # warm the workers
            for backend in BACKENDS:
                decode_s[backend] = timed(lambda b=backend: list(pool.map(decode_only, paths, [b] * len(paths))))
        for backend, s in decode_s.items():
            print(f"decode-only pass, {backend:6s}: {len(paths) / s:7.2f} videos/s")
        best = min(decode_s, key=decode_s.get)

        items = [Item(pth.stem, pth, {}) for pth in paths]
        settings = ShardSettings(frame_counts=COUNTS, size=SIZE, target_bytes=2 * 2**20, backend=best)
        shard_s = timed(lambda: write_shards(items, tmp / "shards", settings, workers=args.workers))
        print(f"sharding ({best}, jpg):   {len(paths) / shard_s:7.2f} videos/s")
        ratio_shard = decode_s[best] / shard_s

        loader = ShardLoader(
            tmp / "shards", shard_sample, first, batch_size=4, shuffle_buffer=16, num_workers=args.workers
        )
        loader_s = timed(lambda: [list(loader.epoch(e)) for e in range(args.epochs)])
        loader_sps = args.epochs * len(paths) / loader_s
        mp4 = DataLoader(Mp4Dataset(paths, best), batch_size=4, num_workers=args.workers, collate_fn=first)
        mp4_s = timed(lambda: list(mp4))
        mp4_sps = len(paths) / mp4_s
        print(f"training loader from shards: {loader_sps:7.2f} samples/s; per-sample mp4 decoding: {mp4_sps:.2f}")

        print(f"RATIO sharding / decode-only = {ratio_shard:.2f} (goal >= 0.7)")
        print(f"RATIO shard loader / per-sample mp4 decoding = {loader_sps / mp4_sps:.1f} (goal >= 5)")
        print(f"RATIO decode-only decord / pyav speed = {decode_s['pyav'] / decode_s['decord']:.2f} (default: {best})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
