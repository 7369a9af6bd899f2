"""SHA-256 digests of files and folders, and a memo that spares re-reading unchanged multi-GB weights.

Content addressing needs the digest of every weight a model loads (an LLM folder holds ~13 GB), and reading them in
every evaluation would cost more than the evaluation. :class:`DigestMemo` remembers each file's digest next to what
its metadata said when it was read -- size, modification time (ns), inode and change time (ns) -- and reads it again
only when one of them differs. This is the trade-off git's index makes. What it does not catch: a file rewritten in
place to the same size whose mtime *and* ctime are set back (ctime can only be set back with the system clock, by
root). ``MERV_DIGEST_MEMO=off`` disables the memo (every digest is read from the bytes).

A folder's digest covers its regular files, hidden ones (``.*``) excepted, by relative path and content, so renaming,
adding, removing or editing any file changes it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "MERV_DIGEST_MEMO"
BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a regular file's bytes (read in 1 MiB blocks); anything else (a FIFO would block) is an
    OSError."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def stat_key(st: os.stat_result) -> list[int]:
    """What the memo compares: size, mtime (ns), inode, ctime (ns)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def tree_files(folder: str | Path) -> list[Path]:
    """The regular files of a folder, recursively, hidden names (``.*``) excepted, in sorted relative-path order."""
    folder = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted((p for p in out if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())


def combine(named: dict[str, str]) -> str:
    """One digest of ``{relative path: digest}`` (order-independent: sorted by path)."""
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(f"{name}\0{named[name]}\n".encode())
    return h.hexdigest()


class DigestMemo:
    """``file(path)``, ``tree(folder)``, ``path(p)`` digests, remembered by file metadata in a JSON file (or only in
    memory when ``store`` is None). Several processes may share one store: each merges its entries in on ``save``."""

    def __init__(self, store: str | Path | None = None):
        self.store = Path(store) if store is not None and os.environ.get(ENV, "").lower() != "off" else None
        self.enabled = os.environ.get(ENV, "").lower() != "off"
        self._entries: dict[str, list] = self._read() if self.store is not None else {}
        self._dirty = False
        self._lock = threading.Lock()
        self.read_bytes = 0  # bytes hashed by this memo (the rest came from the memo)

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.store.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def file(self, path: str | Path) -> str:
        """The SHA-256 of a file, from the memo when its metadata is unchanged."""
        path = Path(os.path.abspath(path))
        st = path.stat()
        key, known = str(path), self._entries.get(str(path))
        if self.enabled and isinstance(known, list) and len(known) == 5 and known[:4] == stat_key(st):
            return known[4]
        digest = sha256_file(path)
        after = path.stat()
        with self._lock:
            self.read_bytes += st.st_size
            if stat_key(after) == stat_key(st):  # not changed while being read: safe to remember
                self._entries[key] = [*stat_key(st), digest]
                self._dirty = True
        return digest

    def files(self, folder: str | Path) -> dict[str, str]:
        """``{relative path: SHA-256}`` of a folder's files (see :func:`tree_files`)."""
        folder = Path(folder)
        return {p.relative_to(folder).as_posix(): self.file(p) for p in tree_files(folder)}

    def tree(self, folder: str | Path) -> str:
        """One digest of a folder's files by relative path and content."""
        return combine(self.files(folder))

    def path(self, path: str | Path) -> str:
        """A file's or a folder's digest."""
        return self.tree(path) if Path(path).is_dir() else self.file(path)

    def save(self) -> None:
        """Merge this memo's entries into its store (atomically; a lost race only costs a re-read later)."""
        if self.store is None or not self._dirty:
            return
        with self._lock:
            merged = {**self._read(), **self._entries}
            self.store.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.store.with_name(f".{self.store.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(merged, sort_keys=True))
            tmp.replace(self.store)
            self._dirty = False
