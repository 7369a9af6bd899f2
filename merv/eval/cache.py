"""A content-addressed, append-only cache of predictions and judge verdicts.

A record's key is the SHA-256 of everything its value depends on (see ``content_key``), so a rerun with nothing
changed finds every answer and makes no model or judge call, and any change (checkpoint, frames, prompt, decoding,
judge model, prompt version) simply misses. Records are appended as they are produced, one JSON line each, flushed
and fsync'ed: a run killed at any point keeps everything written before, and the next run resumes from there.

Every process appends to its own file in the cache folder (created on its first write), so parallel chunk jobs
never interleave lines; readers load all files. A line cut short by a crash is skipped with a warning.

A value is used only if it can be trusted to be what was computed: each record carries the SHA-256 of its key and
value (``d``), so an edited or damaged record is discarded (and its answer recomputed) with a warning, and the reader
checks a value's shape (``get(key, check)``), so a malformed one (``{}``, ``null``, wrong types, a non-finite score)
is discarded too. The digest detects edits and damage; it is not a signature: whoever can write the folder can also
recompute it, so the cache is as trustworthy as the folder's permissions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def content_key(kind: str, payload: dict) -> str:
    """SHA-256 of ``kind`` and the canonical JSON of ``payload`` (sorted keys, no whitespace)."""
    blob = json.dumps({"kind": kind, **payload}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def record_digest(key: str, value) -> str:
    """What a record's ``d`` holds: the SHA-256 of its key and value in canonical JSON."""
    blob = json.dumps({"k": key, "v": value}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


Check = Callable[[object], "str | None"]  # a value's problem, or None when it has the expected shape


class ResultCache:
    """``get(key, check)`` / ``put(key, value)`` over a folder of JSONL files; ``directory=None`` keeps it in memory."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory is not None else None
        self._records: dict[str, list] = {}  # key -> the values read for it, oldest first
        self._checked: set[str] = set()  # keys whose newest value passed a check (not checked again)
        self._lock = threading.Lock()
        self._file = None
        self.hits = 0
        self.writes = 0
        self.discarded = 0
        if self.directory is not None and self.directory.is_dir():
            for path in sorted(self.directory.glob("*.jsonl")):
                self._load(path)

    def _load(self, path: Path) -> None:
        mismatched = []
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    key, value, digest = record["k"], record["v"], record.get("d")
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    # a write cut short by a crash: that one record is lost, never the others
                    log.warning("cache %s line %d is incomplete (interrupted write); skipped", path, number)
                    continue
                if not isinstance(key, str) or digest != record_digest(key, value):
                    mismatched.append(number)
                    continue
                self._records.setdefault(key, []).append(value)
        if mismatched:  # one warning a file: a cache written by an older merv has no digests at all
            self.discarded += len(mismatched)
            shown = ", ".join(map(str, mismatched[:5])) + (", ..." if len(mismatched) > 5 else "")
            log.warning(
                "cache %s: %d record(s) do not match their digest (edited or damaged, or written by an older merv), "
                "lines %s; discarded: their answers are recomputed",
                path,
                len(mismatched),
                shown,
            )

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str, check: Check | None = None):
        """The newest value stored under ``key`` that passes ``check`` (None: any), or None. Values that fail it are
        dropped with a warning, so the caller recomputes them."""
        with self._lock:
            values = self._records.get(key)
            while values:
                value = values[-1]
                problem = check(value) if check is not None and key not in self._checked else None
                if problem is None:
                    self.hits += 1
                    if check is not None:
                        self._checked.add(key)
                    return value
                values.pop()
                self.discarded += 1
                log.warning("cache record %s… is malformed (%s); discarded: it is recomputed", key[:12], problem)
            return None

    def put(self, key: str, value) -> None:
        self.put_many({key: value})

    def put_many(self, items: dict[str, object]) -> None:
        """Store records durably (one write and one fsync for all of them) before making them visible."""
        if not items:
            return
        lines = "".join(
            json.dumps({"k": k, "v": v, "d": record_digest(k, v)}, sort_keys=True, ensure_ascii=False, allow_nan=False)
            + "\n"
            for k, v in items.items()
        )
        with self._lock:
            if self.directory is not None:
                f = self._writer()
                f.write(lines.encode())
                f.flush()
                os.fsync(f.fileno())
            for k, v in items.items():
                self._records.setdefault(k, []).append(v)
                self._checked.discard(k)
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
