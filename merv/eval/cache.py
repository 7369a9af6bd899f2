"""A content-addressed, append-only cache of predictions and judge verdicts.

A record's key is the SHA-256 of everything its value depends on (see ``content_key``), so a rerun with nothing
changed finds every answer and makes no model or judge call, and any change (checkpoint, frames, prompt, decoding,
judge model, prompt version) simply misses. Records are appended as they are produced, one JSON line each, flushed
and fsync'ed: a run killed at any point keeps everything written before, and the next run resumes from there.

Every process appends to its own file in the cache folder (created on its first write), so parallel chunk jobs
never interleave lines; readers load all files. A line cut short by a crash is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def content_key(kind: str, payload: dict) -> str:
    """SHA-256 of ``kind`` and the canonical JSON of ``payload`` (sorted keys, no whitespace)."""
    blob = json.dumps({"kind": kind, **payload}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    """``get(key)`` / ``put(key, value)`` over a folder of JSONL files; ``directory=None`` keeps it in memory."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory is not None else None
        self._records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._file = None
        self.hits = 0
        self.writes = 0
        if self.directory is not None and self.directory.is_dir():
            for path in sorted(self.directory.glob("*.jsonl")):
                self._load(path)

    def _load(self, path: Path) -> None:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    self._records[record["k"]] = record["v"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    # a write cut short by a crash: that one record is lost, never the others
                    log.warning("cache %s line %d is incomplete (interrupted write); skipped", path, number)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict | None:
        with self._lock:
            value = self._records.get(key)
            if value is not None:
                self.hits += 1
            return value

    def put(self, key: str, value: dict) -> None:
        self.put_many({key: value})

    def put_many(self, items: dict[str, dict]) -> None:
        """Store records durably (one write and one fsync for all of them) before making them visible."""
        if not items:
            return
        lines = "".join(
            json.dumps({"k": k, "v": v}, sort_keys=True, ensure_ascii=False) + "\n" for k, v in items.items()
        )
        with self._lock:
            if self.directory is not None:
                f = self._writer()
                f.write(lines.encode())
                f.flush()
                os.fsync(f.fileno())
            self._records.update(items)
            self.writes += len(items)

    def _writer(self):
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._file = open(self.directory / name, "ab")  # noqa: SIM115 - kept open for the run's appends
        return self._file

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
