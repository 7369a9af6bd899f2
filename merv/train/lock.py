"""One run per output folder: ``<out>.lock`` is held (``flock``) by the run writing ``<out>`` and ``<out>.work``.

A second run into the same output would load the states the first is deleting (``keep_last``) and overwrite its
checkpoint; it is refused with the other run's PID and host instead. The lock dies with its process (the kernel
releases a ``flock`` when its holder exits, even by SIGKILL), so a crashed run never blocks the next one; the file it
leaves behind is simply taken over. On file systems without ``flock`` (some parallel file systems), the lock file is
created exclusively and a leftover one is taken over when its PID is gone from this host.

Under several processes only rank 0 takes the lock, and every rank learns whether it did.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copy of the lock descriptor: a flock belongs to the open file,
    so a worker outliving a killed trainer would otherwise keep the output locked."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class OutputInUse(ValueError):
    """Another live run holds the output folder."""


def lock_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".lock")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22): a PID reused by another
    process has another start time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder recorded in a lock file still runs (only knowable on its own host)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    started = _start_time(pid)
    return started is None or holder.get("start_time") in (None, started)


def _describe(holder: dict, path: Path) -> str:
    return (
        f"PID {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started', '?')}; lock file {path})"
    )


class OutputLock:
    """Exclusive use of an output folder by this process; a context manager."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(out)
        self.fd: int | None = None
        self.exclusive_file = False  # True when held by O_EXCL creation instead of flock

    def record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_time": _start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _read_holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict) -> OutputInUse:
        return OutputInUse(
            f"{self.out} is in use by another run: {_describe(holder, self.path)}. Wait for it to finish or stop "
            "it; a lock left by a process that is gone is taken over automatically"
        )

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # retried only when the file was replaced between open and flock
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR | os.O_CLOEXEC), False
                except FileNotFoundError:
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._holder()) from None
            except OSError as e:
                if e.errno not in NO_FLOCK:
                    os.close(fd)
                    raise
                if created:  # no flock here, but creating the file exclusively made it ours
                    self.exclusive_file = True
                    return self._hold(fd)
                os.close(fd)
                return self._acquire_exclusive_file()
            # the holder before us may have removed the file after we opened it: ours must still be the one there
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self._read_holder()
            if previous.get("pid"):
                log.info("taking over the lock of %s: that process is gone", _describe(previous, self.path))
            return self._hold(fd)
        raise OSError(f"could not lock {self.path}: it keeps being replaced")

    def _hold(self, fd: int) -> OutputLock:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.record()).encode())
        self.fd = fd
        _HELD.add(fd)
        return self

    def _holder(self) -> dict:
        """The holder's record; a moment's grace when it has just taken the lock and not yet written it."""
        for _ in range(10):
            if holder := self._read_holder():
                return holder
            time.sleep(0.05)
        return {}

    def _acquire_exclusive_file(self) -> OutputLock:
        """No flock here: create the file exclusively; take over one left by a process gone from this host."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == socket.gethostname() and not _alive(holder):
                    log.info("taking over the lock of %s: that process is gone", _describe(holder, self.path))
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._refuse(holder) from None
            self.exclusive_file = True
            return self._hold(fd)
        raise OSError(f"could not lock {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still held: whoever opened the old file re-checks its inode
        _HELD.discard(self.fd)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold_output(out: Path, d=None):
    """Hold ``out``'s lock for the duration (rank 0 holds it; every rank raises :class:`OutputInUse` if it failed)."""
    from merv.train.distributed import Dist, all_reduce_sum

    d = d or Dist()
    lock, refused = None, None
    if d.is_main:
        try:
            lock = OutputLock(out).acquire()
        except OutputInUse as e:
            refused = e
    if all_reduce_sum(float(refused is not None), d) > 0:
        raise refused or OutputInUse(f"{out} is in use by another run (rank 0 could not lock it)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def holds_output_lock(train):
    """Decorator for a function with an ``out`` argument: it runs holding ``out``'s lock."""
    signature = inspect.signature(train)

    @functools.wraps(train)
    def locked(*args, **kwargs):
        from merv.train.distributed import init_distributed

        out = signature.bind(*args, **kwargs).arguments["out"]
        with hold_output(Path(out), init_distributed()):
            return train(*args, **kwargs)

    return locked
