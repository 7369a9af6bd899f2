"""Videos and frame lists from the URLs a chat request carries: ``file://`` (inside an allowed folder), ``data:``
(base64) and ``http(s)://`` (downloaded with a size cap and a timeout), decoded into each encoder's frames.

A problem with one item becomes a :class:`ServeError` naming the item (its place in the request) and the reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from merv.data.video import VideoError, read_frames, resize_to, sample_frame_indices, short_side_size
from merv.serve.protocol import ServeError

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv"}
MAX_FRAMES = 512  # most image_url frames one request may carry
MAX_LISTED = 1000  # most videos the chat page's list shows
DOWNLOAD_CHUNK = 1 << 16


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may point at and how much it may bring."""

    allowed_dirs: tuple[Path, ...]
    max_bytes: int
    download_timeout_s: float

    def local_path(self, url: str, param: str) -> Path:
        """The file a ``file://`` URL names, if it lies inside an allowed folder (symlinks resolved first)."""
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ServeError(400, f"{param}: file URL with a host ({parsed.netloc!r}) is not supported", "invalid_url")
        path = Path(unquote(parsed.path)).resolve()
        if not self.allowed_dirs:
            raise ServeError(
                403, f"{param}: file URLs are disabled (start merv serve with --allowed-dir)", "path_not_allowed", param
            )
        if not any(path.is_relative_to(d) for d in self.resolved_dirs()):
            raise ServeError(
                403,
                f"{param}: {path} is outside the allowed folders ({', '.join(map(str, self.resolved_dirs()))})",
                "path_not_allowed",
                param,
            )
        if not path.exists():
            raise ServeError(400, f"{param}: {path}: file not found", "invalid_video", param)
        return path

    def resolved_dirs(self) -> list[Path]:
        return [Path(d).resolve() for d in self.allowed_dirs]

    def too_large(self, param: str, size: int | str) -> ServeError:
        return ServeError(
            413, f"{param}: {size} bytes is over the upload limit of {self.max_bytes} bytes", "upload_too_large", param
        )

    def decode_data_url(self, url: str, param: str) -> tuple[bytes, str]:
        """``data:<mime>;base64,<payload>`` -> ``(bytes, mime)``; the size is checked before decoding."""
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ServeError(400, f"{param}: a data URL must be 'data:<mime type>;base64,<data>'", "invalid_url", param)
        if len(payload) * 3 // 4 > self.max_bytes:
            raise self.too_large(param, len(payload) * 3 // 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ServeError(
                400, f"{param}: the data URL's payload is not valid base64", "invalid_url", param
            ) from None
        return data, header[len("data:") : -len(";base64")].split(";")[0]

    async def download(self, url: str, param: str) -> tuple[bytes, str]:
        """GET ``url`` -> ``(bytes, content type)``, refusing more than ``max_bytes`` and giving up after the
        timeout (for the whole download, not per read)."""
        import httpx

        async def get() -> tuple[bytes, str]:
            async with (
                httpx.AsyncClient(follow_redirects=True, timeout=self.download_timeout_s) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise ServeError(
                        400, f"{param}: downloading {url} failed: HTTP {response.status_code}", "download_failed", param
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise self.too_large(param, declared)
                data = bytearray()
                async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK):
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise self.too_large(param, f"more than {len(data)}")
                return bytes(data), response.headers.get("content-type", "").split(";")[0]

        try:
            return await asyncio.wait_for(get(), self.download_timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise ServeError(
                400,
                f"{param}: downloading {url} timed out after {self.download_timeout_s:g} s",
                "download_failed",
                param,
            ) from None
        except httpx.HTTPError as e:
            raise ServeError(
                400, f"{param}: downloading {url} failed: {e or type(e).__name__}", "download_failed", param
            ) from None

    async def fetch(self, url: str, param: str) -> tuple[Path | bytes, str]:
        """A local path (``file://``) or the bytes (``data:``, ``http(s)://``) with a MIME type or suffix hint."""
        scheme = urlparse(url).scheme.lower()
        if scheme == "file":
            path = self.local_path(url, param)
            return path, path.suffix
        if scheme == "data":
            return self.decode_data_url(url, param)
        if scheme in ("http", "https"):
            data, mime = await self.download(url, param)
            return data, Path(urlparse(url).path).suffix or mime
        raise ServeError(
            400,
            f"{param}: unsupported URL scheme {scheme or '(none)'!r} (use file://, data: or http(s)://)",
            "invalid_url",
            param,
        )


def suffix_for(hint: str) -> str:
    """A file suffix from a suffix or MIME type hint (decoders sniff the content; images go by suffix)."""
    if hint.startswith("."):
        return hint.lower()
    return mimetypes.guess_extension(hint or "") or ".mp4"


def frames_per_encoder(model, frames: np.ndarray, positions: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """A decoded frame stack and each frame count's positions -> transformed ``{encoder: [T_e, 3, S_e, S_e]}``."""
    picked = {name: frames[positions[enc.num_frames]] for name, enc in model.encoders.items()}
    return model.transform(picked)


def frame_size(model) -> int:
    """The short side frames are decoded at: what every encoder's own resize needs (no upsampling)."""
    from merv.data.transforms import frame_size as encoders_frame_size

    return encoders_frame_size(model.cfg.encoders)


def video_tensors(model, path: Path, what: str, param: str, temporary: bool = False) -> dict[str, torch.Tensor]:
    """Decode a video file (or folder of frames) with each encoder's uniform sampling (blocking: run in a thread).

    ``temporary``: ``path`` is where a data URL or download was written, a name that means nothing to the client."""
    counts = [enc.num_frames for enc in model.encoders.values()]
    try:
        frames, positions = read_frames(path, counts, frame_size(model))
    except VideoError as e:
        reason = e.reason.replace(str(path), "the sent video") if temporary else e.reason
        raise ServeError(400, f"{param}: cannot read the video ({what}): {reason}", "invalid_video", param) from None
    return frames_per_encoder(model, frames, positions)


def decode_image(source: Path | bytes, param: str) -> np.ndarray:
    """One RGB uint8 frame ``[H, W, 3]`` from an image file or its bytes (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ServeError(400, f"{param}: not a decodable image ({reason})", "invalid_image", param) from None


def frame_list_tensors(model, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """A list of frames (one video, in order) -> each encoder's frames, sampled uniformly from the list."""
    # frames may differ in size: all take the first frame's shape at the decode size, as one video's frames would
    shape = short_side_size(images[0].shape[0], images[0].shape[1], frame_size(model))
    frames = np.concatenate([resize_to(im[None], shape) for im in images])
    counts = sorted({enc.num_frames for enc in model.encoders.values()})
    positions = {c: sample_frame_indices(len(frames), c) for c in counts}
    return frames_per_encoder(model, frames, positions)


def list_videos(roots: dict[str, Path]) -> list[dict]:
    """The videos under the allowed folders (``{label: folder}``), for the chat page: name, ``file://`` URL, size."""
    found = []
    for label, root in roots.items():
        for path in sorted(Path(root).resolve().rglob("*")):
            if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
                name = f"{label}/{path.relative_to(Path(root).resolve())}"
                found.append({"name": name, "url": path.as_uri(), "bytes": path.stat().st_size})
                if len(found) >= MAX_LISTED:
                    return found
    return found
