"""The options of ``merv serve`` as one typed record (the CLI fills it; tests and scripts may build it directly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20


@dataclass(frozen=True)
class ServeSettings:
    """How ``merv serve`` loads its model, where it listens, what media it accepts and how it batches."""

    model: str  # checkpoint folder (or a preset name, for smoke tests: untrained projectors answer nonsense)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the chosen one is printed)
    device: str = "auto"
    dtype: str = "auto"
    served_model_name: str | None = None  # default: the model config's name
    allowed_dirs: tuple[Path, ...] = field(default_factory=tuple)  # folders file:// URLs may point into
    max_upload_mb: float = 200.0  # largest video or frame set a request may carry (data URL, download, upload)
    download_timeout_s: float = 30.0
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
        for d in self.allowed_dirs:
            if not Path(d).is_dir():
                raise ValueError(f"--allowed-dir {d}: not a folder")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)
