"""Media decoding behind one interface: videos (decord or PyAV), folders of frames, and still images.

Every source gives RGB uint8 frames ``[N, H, W, 3]`` with display rotation applied and per-frame timestamps (so clip
windows are right for variable frame rate), and fails with a :class:`VideoError` that names the file and gives a
one-line reason instead of a decoder's stack dump.
"""

from __future__ import annotations

import math
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import numpy as np

from merv.settings import Backend, ShardsSection

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
BACKENDS = get_args(Backend)
DEFAULT_BACKEND = ShardsSection.backend
FOLDER_FPS = 1.0  # frame folders carry no timing: 1 frame a second unless told (VLEP's are 3 fps: merv.data.benchmarks)
SEEK_GAP = 64  # PyAV: seek instead of decoding through gaps longer than this many frames
# decord: frames decoded at a time when they are resized after decoding (about this many bytes of native RGB), so
# that each chunk is resized while it is still in the CPU's cache: decoding a large clip's sampled frames in one
# batch and resizing them after took 11-17% more CPU (a 1080p and a 720p clip, issue 22)
CHUNK_BYTES = 8 << 20
# the scaler FFmpeg's scale filter uses by default, which decord's decoding graph applies: PyAV scales with the same
# when frames are scaled inside the decoder (``scale_in_decoder``)
DECODER_SCALER = "BICUBIC"


class VideoError(Exception):
    """A media item that cannot be used: missing, empty, corrupt, without video, or without frames."""

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


def clip_window(
    timestamps: np.ndarray, time: tuple[float, float] | None = None, end_frame: int | None = None
) -> tuple[int, int]:
    """Frame range ``[lo, hi)`` of a clip: a ``time`` window in seconds (by frame timestamps, so variable frame rate
    is exact) and/or an ``end_frame`` limit; the whole video when neither is given. An empty window falls back to
    the frame nearest its start, so a valid window never yields zero frames."""
    n = len(timestamps)
    lo, hi = 0, n
    if time is not None:
        start, stop = float(time[0]), float(time[1])
        if stop < start:
            raise ValueError(f"time window [{start}, {stop}] ends before it starts")
        lo = int(np.searchsorted(timestamps, start, side="left"))
        hi = int(np.searchsorted(timestamps, stop, side="right"))
    if end_frame is not None:
        hi = min(hi, int(end_frame))
    lo = min(lo, n - 1)
    return lo, max(hi, lo + 1)


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(height, width)`` scaled so that the short side is ``size``, the long side rounded to the nearest pixel
    (halves up): 360 x 640 at 224 -> 224 x 398."""
    short, long_ = min(height, width), max(height, width)
    scaled = (2 * long_ * size + short) // (2 * short)  # round(long * size / short) in integers
    return (size, scaled) if height <= width else (scaled, size)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 -> ``[F, H', W', 3]`` uint8 with the short side ``size`` and the aspect ratio kept
    (bilinear, antialiased), so that each encoder's transform can still centre-crop or squash as its own processor
    does."""
    return resize_to(frames, short_side_size(frames.shape[1], frames.shape[2], size))


def resize_to(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 -> ``[F, *shape, 3]`` uint8 (bilinear, antialiased; unchanged when already that size)."""
    if tuple(shape) == frames.shape[1:3]:
        return frames
    import torch

    return _resize_tensor(torch.from_numpy(np.ascontiguousarray(frames)), shape)


def _resize_tensor(frames, shape: tuple[int, int]) -> np.ndarray:
    """The resize itself, on a contiguous ``[F, H, W, 3]`` uint8 tensor (from numpy, or a decoder's own buffer)."""
    import torch.nn.functional as F

    # uint8 in, channels-last: torch's vectorised uint8 path, ~20x faster than resizing floats (issue 13)
    x = F.interpolate(frames.permute(0, 3, 1, 2), size=tuple(shape), mode="bilinear", antialias=True,
                      align_corners=False)  # fmt: skip
    return x.permute(0, 2, 3, 1).contiguous().numpy()


# ------------------------------------------------------------------------------------------------------------------
# Sources


class Media(ABC):
    """An opened media item with ``timestamps`` (seconds, one per frame, sorted)."""

    def __init__(self, path: Path):
        self.path = path
        self.timestamps = np.zeros(0)

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @abstractmethod
    def frames(self, indices: list[int]) -> np.ndarray:
        """RGB uint8 ``[len(indices), H, W, 3]`` for sorted frame indices (repeats allowed)."""

    def sized_frames(self, indices: list[int], size: int) -> np.ndarray:
        """:meth:`frames` with the short side at ``size`` (:func:`resize_frames`; a video opened with ``scale_to``
        gives them at that size straight from its decoder)."""
        return resize_frames(self.frames(indices), size)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _rgb(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 3:  # [N, H, W] grayscale
        frames = frames[..., None]
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames[..., :3]


def _rotate(frames: np.ndarray, degrees: int) -> np.ndarray:
    """Apply a display rotation given, as FFmpeg reports it, in degrees counter-clockwise."""
    turns = round(degrees / 90) % 4
    return np.ascontiguousarray(np.rot90(frames, k=turns, axes=(1, 2))) if turns else frames


def _open_container(path: Path):
    import av

    try:
        container = av.open(str(path))
    except Exception as e:
        raise VideoError(path, f"not a decodable video ({_first_line(e)})") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        raise VideoError(path, f"no video stream (streams: {', '.join(kinds) or 'none'})")
    return container


def _iso_boxes(f, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """``(type, payload start, payload end)`` of the ISO-BMFF boxes in bytes ``[start, end)`` of ``f``."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        size, kind = struct.unpack(">I4s", f.read(8))
        header = 8
        if size == 1:  # 64-bit size follows
            (size,) = struct.unpack(">Q", f.read(8))
            header = 16
        elif size == 0:  # to the end of the enclosing box
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"box {kind!r} at {pos} overruns its container")
        yield kind, pos + header, pos + size
        pos += size


def _child(f, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((a, b) for k, a, b in _iso_boxes(f, start, end) if k == kind), None)


def _matrix_2x2(f, payload: int, offsets: tuple[int, int]) -> np.ndarray:
    """The rotation/scale part ``[[a, b], [c, d]]`` of a tkhd/mvhd matrix (offset by the box's version)."""
    f.seek(payload)
    version = f.read(1)[0]
    f.seek(payload + offsets[version == 1])
    m = struct.unpack(">9i", f.read(36))
    return np.array([[m[0], m[1]], [m[3], m[4]]], dtype=np.float64)


def _sample_entry_size(f, stbl: tuple[int, int]) -> tuple[int, int] | None:
    """``(height, width)`` of the first visual sample entry of a track's ``stsd`` (the coded frame size)."""
    stsd = _child(f, *stbl, b"stsd")
    if stsd is None:
        return None
    entry = next(_iso_boxes(f, stsd[0] + 8, stsd[1]), None)  # after version, flags and the entry count
    if entry is None or entry[2] - entry[1] < 28:
        return None
    f.seek(entry[1] + 24)  # reserved and data reference (8), pre-defined and reserved (16), then width, height
    width, height = struct.unpack(">HH", f.read(4))
    return (height, width) if width and height else None


def _mp4_video_track(path: Path) -> tuple[int, tuple[int, int] | None] | None:
    """Display rotation (degrees counter-clockwise, as FFmpeg reports it) and frame size ``(height, width)`` of an
    MP4/MOV file's video track, read from its header boxes without decoding anything. The rotation is the track
    matrix (tkhd) times the movie matrix (mvhd), as FFmpeg's mov demuxer combines them; the size is the sample
    entry's (stsd), given only where the track header's size says the same (square pixels: what a decoder outputs).
    None when the file is not ISO-BMFF, has no or several video tracks, or its boxes do not parse; the caller then
    asks FFmpeg."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = next(_iso_boxes(f, 0, size), None)
            if first is None or first[0] not in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"):
                return None
            moov = _child(f, 0, size, b"moov")
            if moov is None:
                return None
            movie, videos = np.eye(2), []
            for kind, a, b in _iso_boxes(f, *moov):
                if kind == b"mvhd":
                    movie = _matrix_2x2(f, a, (36, 48)) / 65536
                elif kind == b"trak":
                    tkhd, mdia = _child(f, a, b, b"tkhd"), _child(f, a, b, b"mdia")
                    hdlr = _child(f, *mdia, b"hdlr") if mdia else None
                    if tkhd and hdlr:
                        f.seek(hdlr[0] + 8)
                        if f.read(4) == b"vide":
                            minf = _child(f, *mdia, b"minf")
                            stbl = _child(f, *minf, b"stbl") if minf else None
                            coded = _sample_entry_size(f, stbl) if stbl else None
                            videos.append((_matrix_2x2(f, tkhd[0], (40, 52)) / 65536, coded, _track_size(f, tkhd[0])))
    except (OSError, ValueError, struct.error, IndexError):
        return None
    if len(videos) != 1:
        return None
    matrix, coded, shown = videos[0]
    m = matrix @ movie
    scale_x, scale_y = np.hypot(m[0, 0], m[1, 0]), np.hypot(m[0, 1], m[1, 1])
    if not scale_x or not scale_y:
        return None
    rotation = -round(math.degrees(math.atan2(m[0, 1] / scale_y, m[0, 0] / scale_x)))
    return rotation, coded if coded == shown else None


def _track_size(f, payload: int) -> tuple[int, int]:
    """``(height, width)`` of a track header (tkhd), rounded from 16.16 fixed point."""
    f.seek(payload)
    version = f.read(1)[0]
    f.seek(payload + (88 if version == 1 else 76))
    width, height = struct.unpack(">II", f.read(8))
    return round(height / 65536), round(width / 65536)


def _mp4_rotation(path: Path) -> int | None:
    """Display rotation of an MP4/MOV file's video track from its header (:func:`_mp4_video_track`), else None."""
    track = _mp4_video_track(path)
    return None if track is None else track[0]


def _video_track(path: Path) -> tuple[int, tuple[int, int] | None]:
    """Display rotation and, where the header gives it, frame size of a video: from the MP4/MOV header when it is
    one (no decoding, no second open), else the rotation of the first decoded frame's display matrix through PyAV
    (0 when absent or unreadable) and no size."""
    track = _mp4_video_track(path)
    return track if track is not None else (_decoded_rotation(path), None)


def _display_rotation(path: Path) -> int:
    """Display rotation of a video (:func:`_video_track`)."""
    return _video_track(path)[0]


def _decoded_rotation(path: Path) -> int:
    """Rotation of the first frame's display matrix (0 when absent or unreadable)."""
    try:
        with _open_container(path) as container:
            for frame in container.decode(video=0):
                return int(getattr(frame, "rotation", 0) or 0)
    except Exception:
        return 0
    return 0


def _coded_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of the frames a decoder gives, as FFmpeg's stream header says (no decoding)."""
    try:
        with _open_container(path) as container:
            codec = container.streams.video[0].codec_context
            return (codec.height, codec.width) if codec.width and codec.height else None
    except Exception:
        return None


class DecordVideo(Media):
    """A video decoded by decord; with ``scale_to``, its frames come out of decord's decoding graph with the short
    side at that size (FFmpeg's scaler, :data:`DECODER_SCALER`), ``native`` being their size before scaling
    (``(height, width)``; asked of FFmpeg when not given)."""

    def __init__(self, path: Path, scale_to: int | None = None, native: tuple[int, int] | None = None):
        super().__init__(path)
        import decord

        self.shape = None  # (height, width) the decoder scales to
        if scale_to is not None:
            native = native or _coded_size(path)
            self.shape = short_side_size(*native, scale_to) if native else None
        scaled = {"height": self.shape[0], "width": self.shape[1]} if self.shape else {}
        try:
            self.reader = decord.VideoReader(str(path), num_threads=1, **scaled)
            n = len(self.reader)
        except Exception as e:
            # decord's messages are C++ traces; PyAV tells what is wrong (no video stream, not a media file)
            _open_container(path).close()
            raise VideoError(path, f"not a decodable video ({_first_line(e)})") from None
        if n == 0:
            raise VideoError(path, "video has no frames")
        self.timestamps = np.asarray(self.reader.get_frame_timestamp(list(range(n))))[:, 0]

    def _batch(self, indices: list[int]):
        try:
            return self.reader.get_batch(list(indices))
        except Exception as e:
            raise VideoError(self.path, f"decoding failed ({_first_line(e)})") from None

    def frames(self, indices: list[int]) -> np.ndarray:
        return _rgb(self._batch(indices).asnumpy())

    def sized_frames(self, indices: list[int], size: int) -> np.ndarray:
        """Decoded and resized chunk by chunk (:data:`CHUNK_BYTES`), each chunk resized straight from decord's
        buffer: the same bytes as resizing the whole stack, without copying or keeping the native-size frames."""
        if self.shape is not None:
            return self.frames(indices)  # already scaled by the decoder
        out, pos, step = [], 0, 1
        while pos < len(indices):
            batch = self._batch(indices[pos : pos + step])
            pos += step
            n, height, width, channels = batch.shape
            shape = short_side_size(height, width, size)
            if channels != 3 or shape == (height, width):
                out.append(resize_frames(_rgb(batch.asnumpy()), size))
            else:
                from torch.utils.dlpack import from_dlpack

                out.append(_resize_tensor(from_dlpack(batch.to_dlpack()), shape))
            step = max(1, CHUNK_BYTES // (height * width * channels))
        return out[0] if len(out) == 1 else np.concatenate(out)


class PyAVVideo(Media):
    """A video decoded by PyAV; with ``scale_to``, each frame is converted to RGB with its short side (after display
    rotation) at that size in one pass of FFmpeg's scaler (:data:`DECODER_SCALER`)."""

    def __init__(self, path: Path, scale_to: int | None = None):
        super().__init__(path)
        self.scale_to = scale_to
        with _open_container(path) as container:
            stream = container.streams.video[0]
            try:
                pts = sorted(p.pts for p in container.demux(stream) if p.size and p.pts is not None)
            except Exception as e:
                raise VideoError(path, f"not a decodable video ({_first_line(e)})") from None
            self.time_base = float(stream.time_base) if stream.time_base else 1.0
        if not pts:
            raise VideoError(path, "video has no frames")
        self.pts = np.asarray(pts, dtype=np.int64)
        self.timestamps = (self.pts - self.pts[0]) * self.time_base
        self.rotation = 0

    def frames(self, indices: list[int]) -> np.ndarray:
        wanted = sorted(set(indices))
        got: dict[int, np.ndarray] = {}
        try:
            with _open_container(self.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                current, decoder = -1, container.decode(stream)
                for target in wanted:
                    if target in got:
                        continue
                    if target - current > SEEK_GAP:
                        container.seek(int(self.pts[target]), stream=stream, backward=True, any_frame=False)
                        decoder = container.decode(stream)
                    for frame in decoder:
                        current = self._index(frame, current)
                        if current in wanted:
                            self.rotation = int(getattr(frame, "rotation", 0) or 0)
                            got[current] = self._to_rgb(frame)
                        if current >= target:
                            break
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(self.path, f"decoding failed ({_first_line(e)})") from None
        missing = [i for i in wanted if i not in got]
        if missing:
            raise VideoError(self.path, f"decoding failed (frames {missing[:3]} of {self.num_frames} not decodable)")
        return _rotate(np.stack([got[i] for i in indices]), self.rotation)

    def _to_rgb(self, frame) -> np.ndarray:
        if self.scale_to is None:
            return frame.to_ndarray(format="rgb24")
        # before the display rotation: a quarter turn swaps both the frame's sides and the scaled ones
        height, width = short_side_size(frame.height, frame.width, self.scale_to)
        return frame.to_ndarray(width=width, height=height, format="rgb24", interpolation=DECODER_SCALER)

    def sized_frames(self, indices: list[int], size: int) -> np.ndarray:
        frames = self.frames(indices)
        return frames if self.scale_to == size else resize_frames(frames, size)

    def _index(self, frame, previous: int) -> int:
        if frame.pts is None:
            return previous + 1
        i = int(np.searchsorted(self.pts, frame.pts))
        return i if i < len(self.pts) and self.pts[i] == frame.pts else previous + 1


class StillImage(Media):
    """An image: a one-frame clip."""

    def __init__(self, path: Path):
        super().__init__(path)
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as img:
                self.image = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        except Exception as e:
            raise VideoError(path, f"not a decodable image ({_first_line(e)})") from None
        self.timestamps = np.zeros(1)

    def frames(self, indices: list[int]) -> np.ndarray:
        return np.stack([self.image for _ in indices])


class FrameFolder(Media):
    """A folder of frame images, in natural order of their names (``frame_2`` before ``frame_10``), ``fps`` frames
    a second (their timestamps place clip windows)."""

    def __init__(self, path: Path, fps: float = FOLDER_FPS):
        super().__init__(path)
        if not fps > 0:
            raise ValueError(f"{path}: a frame folder's fps must be positive, got {fps}")
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise VideoError(path, "folder has no image frames")
        natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
        self.files = sorted(files, key=natural)
        self.timestamps = np.arange(len(self.files)) / fps

    def frames(self, indices: list[int]) -> np.ndarray:
        images = {i: StillImage(self.files[i]).image for i in sorted(set(indices))}
        shapes = {im.shape for im in images.values()}
        if len(shapes) > 1:
            raise VideoError(self.path, f"frames differ in size ({sorted(shapes)[:2]})")
        return np.stack([images[i] for i in indices])


def open_media(
    path: str | Path, backend: str = DEFAULT_BACKEND, folder_fps: float = FOLDER_FPS, scale_to: int | None = None
) -> Media:
    """Open a video file, a folder of frames (``folder_fps`` frames a second), or an image. ``scale_to``: a video's
    decoder scales its frames to that short side (images and frame folders are not scaled here)."""
    path = Path(path)
    if not path.exists():
        raise VideoError(path, "file not found")
    if path.is_dir():
        return FrameFolder(path, folder_fps)
    if not path.is_file():
        raise VideoError(path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise VideoError(path, "unreadable (permission denied)")
    if path.stat().st_size == 0:
        raise VideoError(path, "file is empty (0 bytes)")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return StillImage(path)
    if backend == "decord":
        rotation, size = _video_track(path)
        # decord ignores display rotation and fails on some rotated files: those go to PyAV
        return DecordVideo(path, scale_to, size) if rotation == 0 else PyAVVideo(path, scale_to)
    if backend == "pyav":
        return PyAVVideo(path, scale_to)
    raise ValueError(f"unknown decoding backend {backend!r}; available: {list(BACKENDS)}")


def read_frames(
    path: str | Path,
    frame_counts: list[int],
    size: int,
    *,
    time: tuple[float, float] | None = None,
    end_frame: int | None = None,
    backend: str = DEFAULT_BACKEND,
    folder_fps: float = FOLDER_FPS,
    scale_in_decoder: bool = False,
) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Decode the union of uniform samples for every count in ``frame_counts`` inside the clip window, resized so
    that the short side is ``size`` (aspect ratio kept).

    Returns ``(frames [F, H, W, 3] uint8 with min(H, W) == size, {count: positions into frames})`` so that each
    encoder can pick exactly its own frames from one decoded stack. A folder of frames is taken to hold
    ``folder_fps`` frames a second. ``scale_in_decoder``: a video's decoder scales its frames (FFmpeg's bicubic
    scaler, from the decoded YUV) instead of :func:`resize_frames` resizing its RGB frames: faster on large videos,
    other pixels (docs/data.md).
    """
    scale_to = size if scale_in_decoder else None
    with open_media(path, backend, folder_fps, scale_to) as media:
        lo, hi = clip_window(media.timestamps, time, end_frame)
        per_count = {c: sample_frame_indices(media.num_frames, c, lo, hi) for c in sorted(set(frame_counts))}
        union = sorted({i for idx in per_count.values() for i in idx})
        try:
            frames = media.sized_frames(union, size)
        except VideoError:
            if not isinstance(media, DecordVideo):
                raise
            # decord rejects some streams that FFmpeg decodes (odd layouts): give PyAV the last word
            frames = PyAVVideo(Path(path), scale_to).sized_frames(union, size)
    position = {frame: pos for pos, frame in enumerate(union)}
    return frames, {c: [position[i] for i in idx] for c, idx in per_count.items()}
