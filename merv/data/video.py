"""Video decoding behind one small interface, with errors that name the file.

Decoders raise whatever their C++ core raises (decord: ``DECORDError`` with a stack dump; PyAV: ``InvalidDataError``);
here every failure becomes a :class:`VideoError` carrying the path and a one-line reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class VideoError(Exception):
    """A video that cannot be used: missing, empty, corrupt, or without frames."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path}: {reason}")


def sample_frame_indices(total: int, count: int, start: int = 0, end: int | None = None) -> list[int]:
    """``count`` indices spread uniformly over frames ``[start, end)``, each at the centre of its segment.

    A clip shorter than ``count`` frames repeats frames (indices stay sorted), so every encoder always gets exactly
    the number of frames it was built for.
    """
    end = total if end is None else min(end, total)
    if count < 1:
        raise ValueError(f"frame count must be >= 1, got {count}")
    if end <= start:
        raise ValueError(f"empty frame window [{start}, {end}) in a video of {total} frames")
    span = end - start
    return [start + min(span - 1, int((i + 0.5) * span / count)) for i in range(count)]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(path, "file not found")
    if not path.is_file():
        raise VideoError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoError(path, "file is empty (0 bytes)")


def read_frames(path: str | Path, frame_counts: list[int], size: int) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Decode the union of uniform samples for every count in ``frame_counts``, resized to ``size`` x ``size``.

    Returns ``(frames [F, size, size, 3] uint8, {count: positions into frames})`` so that each encoder can pick
    exactly its own frames from one decoded stack.
    """
    path = Path(path)
    _check_file(path)
    import decord  # local import: decord starts a thread pool on import

    try:
        # decode at the native size: decord's own resizing breaks on some size pairs
        reader = decord.VideoReader(str(path), num_threads=1)
        total = len(reader)
    except Exception as e:  # decord raises DECORDError (a RuntimeError) with a multi-line C++ trace
        raise VideoError(path, f"not a decodable video ({_first_line(e)})") from None
    if total == 0:
        raise VideoError(path, "video has no frames")
    per_count = {c: sample_frame_indices(total, c) for c in sorted(set(frame_counts))}
    union = sorted({i for idx in per_count.values() for i in idx})
    try:
        frames = reader.get_batch(union).asnumpy()
    except Exception as e:
        raise VideoError(path, f"decoding failed ({_first_line(e)})") from None
    position = {frame: pos for pos, frame in enumerate(union)}
    return resize_frames(frames, size), {c: [position[i] for i in idx] for c, idx in per_count.items()}


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 -> ``[F, size, size, 3]`` uint8 (bilinear, antialiased)."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
