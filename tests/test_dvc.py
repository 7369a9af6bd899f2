"""DVC reproduces the same pipeline from a copy of the repository, with params and metrics wired."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import small_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
    )
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh copy of the project's files (as git sees them) in its own git repository."""
    dest = tmp_path_factory.mktemp("clone")
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    (dest / "config" / "config.yaml").write_text(yaml.safe_dump(small_config()))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        assert run(cmd, dest).returncode == 0
    return dest


def test_dvc_repro_runs_the_pipeline_and_tracks_params(clone):
    res = run(["dvc", "repro"], clone)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], clone).stdout)
    values = json.dumps(metrics)
    assert "synth_mcq" in values and "accuracy" in values
    status = run(["dvc", "status"], clone)
    assert "up to date" in status.stdout, status.stdout

    cfg = yaml.safe_load((clone / "config" / "config.yaml").read_text())
    cfg["eval"]["max_new_tokens"] = 4
    (clone / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    status = run(["dvc", "status", "--json"], clone)
    assert set(json.loads(status.stdout)) == {"eval"}, status.stdout
