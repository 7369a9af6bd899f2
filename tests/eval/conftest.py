"""Fixtures of the evaluation tests: a checkpoint folder of the tiny model and a stand-in judge over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SERVER = Path(__file__).with_name("judge_server.py")


@pytest.fixture(scope="session")
def checkpoint(tiny_model, tiny_run, tmp_path_factory) -> Path:
    """The (randomly initialised) tiny model saved as a checkpoint folder, the way training writes one."""
    from merv.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "finetune"
    meta = {"stage": "finetune", "step": 1, "trained_groups": ["fusion", "projectors"]}
    save_checkpoint(tiny_model, tiny_run, out, {**meta, "config_fingerprint": tiny_run.fingerprint()})
    return out


@dataclass
class JudgeServer:
    proc: subprocess.Popen
    url: str
    log: Path
    args: list[str] = field(default_factory=list)

    def requests(self) -> list[dict]:
        """Every request the server received (its own log)."""
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def start_judge(tmp_path):
    """``start_judge(*server_args, log=...)`` starts a stand-in judge subprocess; all are killed at teardown."""
    started: list[JudgeServer] = []

    def start(*args: str, log: Path | None = None) -> JudgeServer:
        log = log or tmp_path / f"judge-{len(started)}.jsonl"
        cmd = [sys.executable, str(SERVER), "--port", "0", "--log", str(log), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("PORT "), f"judge server did not start: {line!r}"
        server = JudgeServer(proc, f"http://127.0.0.1:{int(line.split()[1])}/v1", log, list(args))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
