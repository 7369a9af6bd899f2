"""The options of ``merv serve`` as one typed record (the CLI fills it; tests and scripts may build it directly).

This is the one place for their defaults: the CLI reads them from here. The security options and the threat each
closes are in ``docs/serving-security.md``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20
API_KEY_ENV = "MERV_API_KEY"  # where --api-key is read from when not given on the command line
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    """How ``merv serve`` loads its model, where it listens, who may call it, what media it accepts and how it
    batches."""

    model: str  # checkpoint folder (or a preset name, for smoke tests: untrained projectors answer nonsense)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the chosen one is printed)
    device: str = "auto"
    dtype: str = "auto"
    served_model_name: str | None = None  # default: the model config's name
    # who may call it
    api_key: str | None = field(default=None, repr=False)  # required (Bearer) on every route but /health when set
    allowed_hosts: tuple[str, ...] = ()  # Host headers accepted besides loopback names ("*": any)
    # what media it accepts
    allowed_dirs: tuple[Path, ...] = field(default_factory=tuple)  # folders file:// URLs may point into
    allowed_media_domains: tuple[str, ...] = ()  # host names http(s):// media may come from; none: http(s) off
    allowed_media_networks: tuple[str, ...] = ()  # private networks (CIDR) those names may resolve into
    max_media_redirects: int = 3  # redirect hops followed for an http(s) media URL, each checked like the first
    max_upload_mb: float = 200.0  # largest video or frame set a request may carry (data URL, download, upload)
    download_timeout_s: float = 30.0
    max_frame_pixels: int = 4096 * 4096  # width x height of one frame, read from the header before decoding
    max_request_pixels: int = 2**28  # all frames a request makes the server decode (e.g. 128 frames of 1080p)
    # how it batches
    max_batch: int = 8  # most requests one generate_batch call serves
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    default_max_tokens: int = 512  # when a request names no max_tokens (MERV's evaluation uses 512)

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb must be > 0, got {self.max_upload_mb}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")
        if self.max_frame_pixels < 1 or self.max_request_pixels < self.max_frame_pixels:
            raise ValueError(
                f"--max-frame-pixels must be >= 1 and --max-request-pixels at least as large, got "
                f"{self.max_frame_pixels} and {self.max_request_pixels}"
            )
        if self.max_media_redirects < 0:
            raise ValueError(f"--max-media-redirects must be >= 0, got {self.max_media_redirects}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("--api-key (or MERV_API_KEY) must be at least 8 characters")
        for d in self.allowed_dirs:
            if not Path(d).is_dir():
                raise ValueError(f"--allowed-dir {d}: not a folder")
        for network in self.allowed_media_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"--allowed-media-network {network!r}: not a network (e.g. 10.1.0.0/16)") from None
        if self.allowed_media_networks and not self.allowed_media_domains:
            raise ValueError("--allowed-media-network needs --allowed-media-domain (http(s) media are off without)")
        if not is_loopback(self.host) and not self.allowed_hosts:
            raise ValueError(
                f"--host {self.host} listens beyond this machine: name the host names clients use with --allowed-host "
                f"(repeatable), or --allowed-host '{ANY_HOST}' to accept any Host header, which leaves the server open "
                "to DNS rebinding from web pages"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def host_names(self) -> frozenset[str] | None:
        """The Host header names accepted (lower case, no port); None: any."""
        if ANY_HOST in self.allowed_hosts:
            return None
        names = {*LOOPBACK_NAMES, *(h.lower().strip("[]") for h in self.allowed_hosts)}
        if self.host not in ("0.0.0.0", "::"):
            names.add(self.host.lower().strip("[]"))
        return frozenset(names)
