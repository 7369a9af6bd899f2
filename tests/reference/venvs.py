"""Virtual environments for reference implementations that cannot share merv's (LanguageBind's code needs
transformers 4.x; merv runs on 5.x).

``reference_python("languagebind")`` returns the venv's interpreter, building the venv first when it is missing or
was built from other requirements (its stamp holds the digest of ``<name>-requirements.txt``, so a changed pin
rebuilds it). ``make reference-venvs`` (run by ``make test``) builds them ahead of the tests:

    python -m tests.reference.venvs languagebind
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENVS = ROOT / ".cache" / "venvs"
# packages installed without their dependencies (the ``languagebind`` package would pull every modality's extras)
NO_DEPS = {"languagebind": ["languagebind==0.1.0"]}


def _digest(name: str) -> str:
    requirements = HERE / f"{name}-requirements.txt"
    return hashlib.sha256(requirements.read_bytes() + repr(NO_DEPS.get(name)).encode()).hexdigest()


def reference_python(name: str) -> Path:
    """The interpreter of reference venv ``name``, built (once, under a lock) if it is missing or stale."""
    venv = VENVS / name
    stamp = venv / ".merv-requirements"
    python = venv / "bin" / "python"
    digest = _digest(name)
    if stamp.is_file() and stamp.read_text() == digest and python.is_file():
        return python
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes wait for one build
        if stamp.is_file() and stamp.read_text() == digest and python.is_file():
            return python
        start = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(HERE / f"{name}-requirements.txt")], check=True)
        if NO_DEPS.get(name):
            subprocess.run([*pip, "--no-deps", *NO_DEPS[name]], check=True)
        stamp.write_text(digest)
        print(f"reference venv {name!r} built in {time.monotonic() - start:.0f} s: {venv}", file=sys.stderr)
    return python


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["languagebind"]:
        print(reference_python(arg))
