"""Test media made here: videos with chosen codecs, sizes, rotation and timing, and every kind of bad input."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def gradient_frames(n: int, height: int, width: int) -> np.ndarray:
    """Frames whose content tells their index (a bright bar moving right) and orientation (red top-left mark)."""
    frames = np.full((n, height, width, 3), 90, dtype=np.uint8)
    for t in range(n):
        x = int(t * (width - 4) / max(1, n - 1))
        frames[t, :, x : x + 4] = 230
        frames[t, : height // 4, : width // 4] = (230, 30, 30)
    return frames


def write_video(
    path: Path,
    frames: np.ndarray,
    fps: int = 10,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    times: list[float] | None = None,
) -> Path:
    """Encode ``frames``; ``times`` (seconds) gives each frame its own timestamp (variable frame rate). A name
    ending in ``.faststart.mp4`` puts the MP4 header (moov) before the media data, as streaming files have it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if path.name.endswith(".faststart.mp4") else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if times is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is not None:
                vf.pts = round(times[i] * 1000)
                vf.time_base = Fraction(1, 1000)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_zero_frames(path: Path) -> Path:
    """A well-formed mp4 with a video stream and no frames."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = 32, 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return path


def make_bad_inputs(folder: Path, good: Path) -> dict[str, Path]:
    """One file of each bad kind (name -> path); ``good`` is a valid video to damage."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        "corrupt": folder / "corrupt.mp4",
        "truncated": folder / "truncated.mp4",
        "zero_byte": folder / "zero_byte.mp4",
        "not_a_video": folder / "not_a_video.mp4",
        "audio_only": folder / "audio_only.mp4",
        "missing": folder / "missing.mp4",
        "unreadable": folder / "unreadable.mp4",
        "zero_frames": folder / "zero_frames.mp4",
    }
    data = good.read_bytes()
    # keep the header and scramble the rest: a container that opens but whose frames do not decode
    rng = np.random.default_rng(0)
    bad["corrupt"].write_bytes(data[:48] + rng.integers(0, 256, len(data) - 48, dtype=np.uint8).tobytes())
    bad["truncated"].write_bytes(data[: len(data) // 3])
    bad["zero_byte"].write_bytes(b"")
    bad["not_a_video"].write_text("just some text, not a video\n" * 20)
    write_audio_only(bad["audio_only"])
    os.mkfifo(bad["unreadable"])  # as root nothing is unreadable by permission; a FIFO is not a regular file
    write_zero_frames(bad["zero_frames"])
    return bad
