"""Videos and frame lists from the URLs a chat request carries: ``file://`` (inside an allowed folder), ``data:``
(base64) and ``http(s)://`` (off unless domains are allowed), decoded into each encoder's frames.

A problem with one item becomes a :class:`ServeError` naming the item (its place in the request) and the reason.

Guards (``docs/serving-security.md``):

- ``http(s)://`` media only from the allowed domains; every address a name resolves to must be public (or inside an
  allowed network), checked when connecting, so a name that resolves differently the second time gains nothing;
  each redirect hop is checked like the first URL; no proxy from the environment is used. A refused URL is refused
  before any connection, with one message, so errors cannot tell open ports from closed ones.
- pixels: each frame's width x height is read from its header before it is decoded, against a budget per frame and
  per request; image frames are resized as they are decoded, so a request holds one full-size frame at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import mimetypes
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import numpy as np
import torch

from merv.data.video import (
    IMAGE_EXTENSIONS,
    VideoError,
    read_frames,
    resize_to,
    sample_frame_indices,
    short_side_size,
)
from merv.serve.protocol import ServeError

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv"}
MEDIA_SUFFIXES = VIDEO_SUFFIXES | IMAGE_EXTENSIONS
REDIRECTS = (301, 302, 303, 307, 308)
MAX_FRAMES = 512  # most image_url frames one request may carry
MAX_LISTED = 1000  # most videos the chat page's list shows
DOWNLOAD_CHUNK = 1 << 16


class PixelBudget:
    """The pixels a request may make the server decode: per frame and in all (one per request)."""

    def __init__(self, per_frame: int, per_request: int):
        self.per_frame, self.per_request, self.used = per_frame, per_request, 0

    def take(self, width: int, height: int, frames: int, param: str, what: str = "frames") -> None:
        if width * height > self.per_frame:
            raise ServeError(
                400,
                f"{param}: {what} of {width}x{height} pixels are over the limit of {self.per_frame} pixels per frame",
                "too_many_pixels",
                param,
            )
        self.used += width * height * frames
        if self.used > self.per_request:
            raise ServeError(
                400,
                f"{param}: the frames so far come to {self.used} pixels, over the limit of {self.per_request} per "
                "request",
                "too_many_pixels",
                param,
            )


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may point at and how much it may bring."""

    allowed_dirs: tuple[Path, ...]
    max_bytes: int
    download_timeout_s: float
    allowed_domains: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    max_redirects: int = 3
    max_frame_pixels: int = 4096 * 4096
    max_request_pixels: int = 2**28
    _networks: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        object.__setattr__(self, "_networks", networks)

    def budget(self) -> PixelBudget:
        return PixelBudget(self.max_frame_pixels, self.max_request_pixels)

    def local_path(self, url: str, param: str) -> Path:
        """The file a ``file://`` URL names, if it lies inside an allowed folder (symlinks resolved first)."""
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ServeError(400, f"{param}: file URL with a host ({parsed.netloc!r}) is not supported", "invalid_url")
        try:
            path = Path(unquote(parsed.path)).resolve()
        except (ValueError, OSError) as e:  # a NUL byte, a loop of links, a name too long
            raise ServeError(400, f"{param}: not a usable file path ({e})", "invalid_url", param) from None
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
        try:
            exists = path.exists()
        except OSError as e:
            raise ServeError(400, f"{param}: {path}: {e.strerror}", "invalid_video", param) from None
        if not exists:
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

    # -- http(s) ---------------------------------------------------------------------------------------------------
    def _refuse(self, param: str, why: str) -> ServeError:
        return ServeError(403, f"{param}: {why}", "media_url_not_allowed", param)

    def check_url(self, url: str, param: str, hop: str = "") -> str:
        """The host of an http(s) media URL the policy allows (by name; addresses are checked when connecting)."""
        parsed = urlparse(url)
        if parsed.scheme.lower() not in ("http", "https"):
            raise self._refuse(param, f"{hop}a {parsed.scheme or 'relative'}: URL, not http(s)")
        if not self.allowed_domains:
            raise self._refuse(
                param, "http(s) media URLs are off (start merv serve with --allowed-media-domain to allow a domain)"
            )
        host = (parsed.hostname or "").rstrip(".").lower()
        if parsed.username is not None or parsed.password is not None:
            raise self._refuse(param, f"{hop}URLs with user information are not allowed")
        if host not in self.allowed_domains:
            raise self._refuse(param, f"{hop}{host or url!r} is not an allowed media domain")
        return host

    def check_address(self, host: str, address: str) -> None:
        """Refuse an address that is not public (loopback, private, link-local such as cloud metadata at
        169.254.169.254, multicast, reserved), unless it lies in an allowed network."""
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self._networks):
            return
        if not ip.is_global or ip.is_multicast:
            kind = next(
                (k for k in ("loopback", "link_local", "private", "multicast", "reserved") if getattr(ip, f"is_{k}")),
                "non-public",
            ).replace("_", "-")
            raise MediaAddressRefused(f"{host} resolves to {ip}, a {kind} address (allow its network with "
                                      "--allowed-media-network if it is meant)")  # fmt: skip

    async def download(self, url: str, param: str) -> tuple[bytes, str]:
        """GET ``url`` -> ``(bytes, content type)``: every hop checked (domain, then the addresses when connecting),
        at most ``max_bytes``, the whole download within the timeout."""
        import httpcore

        async def get(pool) -> tuple[bytes, str]:
            current = url
            for hop in range(self.max_redirects + 1):
                self.check_url(current, param, "" if hop == 0 else "redirect to ")
                async with pool.stream("GET", current, headers=[(b"Accept", b"*/*")]) as response:
                    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                    if response.status in REDIRECTS and "location" in headers:
                        current = urljoin(current, headers["location"])
                        continue
                    if response.status != 200:
                        raise ServeError(
                            400, f"{param}: downloading {url} failed: HTTP {response.status}", "download_failed", param
                        )
                    declared = headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise self.too_large(param, declared)
                    data = bytearray()
                    async for chunk in response.aiter_stream():
                        data += chunk
                        if len(data) > self.max_bytes:
                            raise self.too_large(param, f"more than {len(data)}")
                    return bytes(data), headers.get("content-type", "").split(";")[0]
            raise self._refuse(param, f"more than {self.max_redirects} redirects")

        try:
            async with httpcore.AsyncConnectionPool(network_backend=_guarded_backend(self), retries=0) as pool:
                return await asyncio.wait_for(get(pool), self.download_timeout_s)
        except MediaAddressRefused as e:
            raise self._refuse(param, str(e)) from None
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise ServeError(
                400,
                f"{param}: downloading {url} timed out after {self.download_timeout_s:g} s",
                "download_failed",
                param,
            ) from None
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as e:
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
            self.check_url(url, param)  # before anything else: a refused URL costs nothing and says nothing
            data, mime = await self.download(url, param)
            return data, Path(urlparse(url).path).suffix or mime
        raise ServeError(
            400,
            f"{param}: unsupported URL scheme {scheme or '(none)'!r} (use file://, data: or http(s)://)",
            "invalid_url",
            param,
        )


class MediaAddressRefused(Exception):
    """A media host resolved to an address the policy refuses."""


def _guarded_backend(policy: MediaPolicy):
    """httpcore's network backend, but each connection goes to an address the policy checked for that very
    connection (no second resolution between the check and the connect, so DNS rebinding gains nothing)."""
    import httpcore

    class GuardedBackend(httpcore.AsyncNetworkBackend):
        def __init__(self):
            self.inner = httpcore.AnyIOBackend()

        async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
            for address in addresses:  # every address the name has must pass, not just the first
                policy.check_address(host, address)
            return await self.inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

        async def connect_unix_socket(self, path, timeout=None, socket_options=None):
            raise MediaAddressRefused("unix sockets are not media")

        async def sleep(self, seconds: float) -> None:
            await self.inner.sleep(seconds)

    return GuardedBackend()


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


def video_tensors(
    model, path: Path, what: str, param: str, temporary: bool = False, budget: PixelBudget | None = None
) -> dict[str, torch.Tensor]:
    """Decode a video file (or folder of frames) with each encoder's uniform sampling (blocking: run in a thread);
    its frame size, from the header, is charged to ``budget`` first (for every frame that will be decoded).

    ``temporary``: ``path`` is where a data URL or download was written, a name that means nothing to the client."""
    counts = [enc.num_frames for enc in model.encoders.values()]
    try:
        if budget is not None:
            width, height, still = media_size(path)
            budget.take(width, height, 1 if still else sum(set(counts)), param, "video frames")
        frames, positions = read_frames(path, counts, frame_size(model))
    except VideoError as e:
        reason = e.reason.replace(str(path), "the sent video") if temporary else e.reason
        raise ServeError(400, f"{param}: cannot read the video ({what}): {reason}", "invalid_video", param) from None
    return frames_per_encoder(model, frames, positions)


def decode_image(source: Path | bytes, param: str, budget: PixelBudget | None = None) -> np.ndarray:
    """One RGB uint8 frame ``[H, W, 3]`` from an image file or its bytes (EXIF orientation applied); its size is
    read from the header and charged to ``budget`` before any pixel is decoded."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            if budget is not None:
                budget.take(*img.size, 1, param, "an image")
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except ServeError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ServeError(400, f"{param}: not a decodable image ({reason})", "invalid_image", param) from None


def media_size(path: Path) -> tuple[int, int, bool]:
    """``(width, height, still)`` of a video, image or folder of frames from its header (nothing decoded); ``still``:
    one image, decoded once."""
    from PIL import Image

    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not frames:
            raise VideoError(path, "folder has no image frames")
        with Image.open(frames[0]) as img:
            return *img.size, False
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        with Image.open(path) as img:
            return *img.size, True
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(path, "no video stream")
            context = container.streams.video[0].codec_context
            return int(context.width), int(context.height), False
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(
            path, f"not a decodable video ({str(e).strip().splitlines()[0][:200] if str(e) else e})"
        ) from None


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
