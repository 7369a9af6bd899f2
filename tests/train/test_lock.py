"""The output lock: one run per output folder; a lock left by a dead process is taken over; forked workers of a killed
run do not keep it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from merv.train.lock import OutputInUse, OutputLock, hold_output, lock_path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_output_is_refused_naming_pid_and_host(tmp_path):
    out = tmp_path / "train" / "finetune"
    with OutputLock(out):
        holder = json.loads(lock_path(out).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputInUse, match=rf"PID {os.getpid()} on host {socket.gethostname()}"):
            OutputLock(out).acquire()
        with pytest.raises(OutputInUse), hold_output(out):
            pass
    assert not lock_path(out).exists(), "released and removed"
    with hold_output(out) as lock:  # free again
        assert lock.fd is not None


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "earlier"}
    lock_path(out).write_text(json.dumps(stale))
    with caplog.at_level("INFO", logger="merv.train.lock"), OutputLock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert f"PID {stale['pid']}" in caplog.text and "gone" in caplog.text


def test_workers_forked_by_a_killed_run_do_not_keep_the_lock(tmp_path):
    """A DataLoader worker is a fork of the trainer: it shares the lock's open file, and may outlive a SIGKILLed
    trainer for a while. Its copy is closed at fork."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from merv.train.lock import OutputLock
        OutputLock({str(out)!r}).acquire()
        started, ready = os.pipe()
        worker = os.fork()
        if worker == 0:
            os.write(ready, b"x")
            time.sleep(60)  # the worker lives on
            os._exit(0)
        os.read(started, 1)  # the worker runs (a DataLoader's workers are started before the first batch)
        print("locked", worker, flush=True)
        os._exit(0)  # the trainer dies without releasing anything
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    said, worker = proc.stdout.readline().split()
    try:
        assert said == "locked" and proc.wait(timeout=60) == 0
        os.kill(int(worker), 0)  # the worker is still alive
        with OutputLock(out):
            pass
    finally:
        proc.stdout.close()
        os.kill(int(worker), signal.SIGKILL)


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (some parallel file systems answer ENOLCK)."""

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_the_lock_file_itself_is_the_lock(tmp_path, no_flock, caplog):
    out = tmp_path / "out"
    with OutputLock(out) as lock:
        assert lock.exclusive_file
        with pytest.raises(OutputInUse, match=rf"PID {os.getpid()} on host {socket.gethostname()}"):
            OutputLock(out).acquire()
    assert not lock_path(out).exists()
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    with caplog.at_level("INFO", logger="merv.train.lock"), OutputLock(out):
        pass
    assert "gone" in caplog.text
    other_host = {"pid": dead_pid(), "host": "node-elsewhere", "started": "earlier"}
    lock_path(out).write_text(json.dumps(other_host))  # its liveness cannot be checked from here: refused
    with pytest.raises(OutputInUse, match="on host node-elsewhere"):
        OutputLock(out).acquire()
