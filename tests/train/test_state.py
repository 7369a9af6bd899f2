"""Resume you can trust: damaged, truncated or crafted training states are never loaded, and two runs never share an
output folder. Each case is the exact damage a user (or a hostile neighbour on a shared disk) can do."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.api
from safetensors.torch import load_file

from merv.config import resolve_run_config
from merv.train.loop import Preempted, train_stage
from merv.train.state import work_dir
from tests.conftest import tiny_overrides


def stage_run(tiny_run, **stage):
    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    overrides["train"] = {"stages": {"finetune": {"epochs": 2, "global_batch_size": 4, "micro_batch_size": 2,
                                                  "checkpoint_every": 2, **stage}}}  # fmt: skip
    return resolve_run_config("merv-tiny", overrides)


def stop_after(n: int):
    calls = [0]

    def stop() -> bool:
        calls[0] += 1
        return calls[0] >= n

    return stop


@pytest.fixture(autouse=True, scope="module")
def no_wandb():
    """These runs test resume, not logging: without W&B each takes a second instead of several."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        yield


@pytest.fixture(scope="module")
def resumable(tiny_run, shards, tmp_path_factory, no_wandb):
    """An uninterrupted 6-step run (the reference), and the work folder of a run stopped after step 4: states
    ``step-00000002`` and ``step-00000004``."""
    root = tmp_path_factory.mktemp("resumable")
    run = stage_run(tiny_run)
    train_stage(run, "finetune", shards["finetune"], root / "full", progress=False)
    with pytest.raises(Preempted):
        train_stage(run, "finetune", shards["finetune"], root / "cut", progress=False, stop=stop_after(4))
    states = sorted(p.name for p in work_dir(root / "cut").iterdir())
    assert states == ["step-00000002", "step-00000004"], states
    return run, root


def copy_cut(resumable, tmp_path) -> tuple[Path, Path]:
    """A private copy of the stopped run: ``(out, newest state folder)``."""
    _, root = resumable
    shutil.copytree(work_dir(root / "cut"), work_dir(tmp_path / "cut"))
    return tmp_path / "cut", work_dir(tmp_path / "cut") / "step-00000004"


def resume(resumable, shards, out: Path) -> dict:
    run, _ = resumable
    return train_stage(run, "finetune", shards["finetune"], out, progress=False)


def resume_outcome(resumable, shards, out: Path) -> BaseException | None:
    """Resume, and keep what it raised: a test checks the damage done before it checks how the run ended (DCP's
    CheckpointException is a BaseException)."""
    try:
        resume(resumable, shards, out)
    except (Exception, torch.distributed.checkpoint.api.CheckpointException) as e:
        return e
    return None


def assert_equals_uninterrupted(resumable, out: Path) -> None:
    _, root = resumable
    a, b = load_file(str(root / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors of the resumed run differ from the uninterrupted run's, e.g. {differ[0]}"


def model_tensor_bytes(state: Path) -> tuple[Path, int, int]:
    """Where the raw values of a saved model tensor lie in the state's data file: ``(file, offset, length)``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with open(state / "dcp" / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own file: written by the run above
    for index, info in metadata.storage_data.items():
        tensor = isinstance(metadata.state_dict_metadata[index.fqn], TensorStorageMetadata)
        if index.fqn.startswith("model.") and tensor:
            path = state / "dcp" / info.relative_path
            blob = path.read_bytes()[info.offset : info.offset + info.length]
            values = torch.load(io.BytesIO(blob), weights_only=True).contiguous().numpy().tobytes()
            if len(values) >= 64:
                return path, info.offset + blob.index(values), len(values)
    raise AssertionError("no model tensor in the state")


def forge_manifest(state: Path) -> None:
    """Rewrite the state's manifest so that it vouches for whatever the folder now holds (an attacker with write
    access can always do this)."""
    files = {}
    for path in sorted(p for p in state.rglob("*") if p.is_file() and p.name != "manifest.json"):
        data = path.read_bytes()
        files[path.relative_to(state).as_posix()] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = state / "manifest.json"
    old = json.loads(manifest.read_text()) if manifest.is_file() else {}
    manifest.write_text(json.dumps({**old, "files": files}))


def state_warnings(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.name == "merv.train.state" and r.levelno >= 30)


class Touch:
    """Unpickling this creates ``marker``: what a crafted pickle would do with a shell command instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ------------------------------------------------------------------------------------------------------------------
def small_state(work: Path, step: int, fingerprint: str, keep_last: int = 5) -> Path:
    """A real training state of a small module (what save_state writes for any model), quickly."""
    from merv.data.loader import Position
    from merv.train.state import save_state

    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    extra = {"fingerprint": fingerprint, "metrics": [], "samples_seen": 0}
    return save_state(work, step, model, optimizer, scheduler, Position(0, step), extra, keep_last)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_the_manifest_lists_every_file_with_its_digest(tmp_path):
    from merv.train.state import verify_state

    state = small_state(tmp_path / "w", 3, "fp")
    manifest = json.loads((state / "manifest.json").read_text())
    files = sorted(p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert {"dcp/.metadata", "meta.json", "rank-0.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        data = (state / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert verify_state(state) == manifest
    assert not list((tmp_path / "w").glob("*.tmp")), "the temporary folder is renamed into place"


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda s: (s / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda s: (s / "manifest.json").write_text('{"files": '), "not valid JSON"),
        (lambda s: (s / "manifest.json").write_text("[]"), "not a merv-train-state/1 manifest"),
        (lambda s: edit(s / "meta.json", '"samples_seen": 0', '"samples_seen": 9'), "meta.json: its sha256 differs"),
        (lambda s: (s / "rank-0.json").unlink(), "rank-0.json: missing"),
        (lambda s: (s / "dcp" / "__1_0.distcp").write_bytes(b"x"), "__1_0.distcp: not in the manifest"),
        (lambda s: os.truncate(s / "dcp" / "__0_0.distcp", 10), "(truncated?)"),
    ],
)
def test_each_damage_is_named(tmp_path, damage, says, caplog):
    from merv.train.state import DamagedState, latest_state, verify_state

    work = tmp_path / "w"
    small_state(work, 2, "fp")
    newest = small_state(work, 4, "fp")
    damage(newest)
    with pytest.raises(DamagedState, match=re.escape(says)):
        verify_state(newest)
    with caplog.at_level(logging.WARNING, logger="merv.train.state"):
        assert latest_state(work, "fp").name == "step-00000002"
    assert "step-00000004" in state_warnings(caplog) and "resuming from step-00000002" in state_warnings(caplog)
    assert sorted(p.name for p in work.iterdir()) == ["step-00000002", "step-00000004.damaged"]
    # the run goes on: saving step 4 again and pruning leave the set-aside copy alone
    small_state(work, 4, "fp", keep_last=1)
    assert sorted(p.name for p in work.iterdir()) == ["step-00000004", "step-00000004.damaged"]


def test_no_intact_state_left_starts_over_with_a_warning(tmp_path, caplog):
    from merv.train.state import latest_state

    state = small_state(tmp_path / "w", 2, "fp")
    os.truncate(state / "dcp" / ".metadata", 5)
    with caplog.at_level(logging.WARNING, logger="merv.train.state"):
        assert latest_state(tmp_path / "w", "fp") is None
    assert "step-00000002" in state_warnings(caplog) and "starting over" in state_warnings(caplog)


def test_the_restricted_unpickler_reads_dcp_metadata_and_nothing_else(tmp_path):
    from merv.train.state import DamagedState, parse_metadata

    state = small_state(tmp_path / "w", 1, "fp")
    metadata = parse_metadata((state / "dcp" / ".metadata").read_bytes())
    with open(state / "dcp" / ".metadata", "rb") as f:
        assert metadata == pickle.load(f)
    for evil in (pickle.dumps(Touch(tmp_path / "m")), pickle.dumps(os.system), pickle.dumps({"x": shutil.rmtree})):
        with pytest.raises(DamagedState, match="refusing to unpickle"):
            parse_metadata(evil)
    with pytest.raises(DamagedState, match="not DCP metadata"):
        parse_metadata(pickle.dumps({"a": 1}))
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------------------------
def test_sixteen_changed_bytes_in_a_saved_tensor_are_caught(resumable, shards, tmp_path, caplog):
    out, newest = copy_cut(resumable, tmp_path)
    path, offset, length = model_tensor_bytes(newest)
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        data = f.read(16)
        f.seek(offset + length // 2)
        f.write(bytes(b ^ 0x5A for b in data))
    with caplog.at_level(logging.WARNING, logger="merv.train.state"):
        resume(resumable, shards, out)
    assert_equals_uninterrupted(resumable, out)
    warning = state_warnings(caplog)
    assert "step-00000004" in warning and "step-00000002" in warning and "sha256" in warning, warning


def test_a_truncated_newest_state_falls_back_to_the_intact_one(resumable, shards, tmp_path, caplog):
    out, newest = copy_cut(resumable, tmp_path)
    data = newest / "dcp" / "__0_0.distcp"
    os.truncate(data, data.stat().st_size // 2)  # as a full disk or a killed copy leaves it
    with caplog.at_level(logging.WARNING, logger="merv.train.state"):
        resume(resumable, shards, out)
    warning = state_warnings(caplog)
    assert "step-00000004" in warning and "step-00000002" in warning, warning
    assert_equals_uninterrupted(resumable, out)


def test_a_crafted_metadata_pickle_never_runs(resumable, shards, tmp_path, caplog):
    out, newest = copy_cut(resumable, tmp_path)
    marker = tmp_path / "pwned"
    (newest / "dcp" / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    with caplog.at_level(logging.WARNING, logger="merv.train.state"):
        outcome = resume_outcome(resumable, shards, out)
    assert not marker.exists(), "resume ran code from a crafted .metadata"
    assert outcome is None, repr(outcome)
    warning = state_warnings(caplog)
    assert "step-00000004" in warning and "step-00000002" in warning, warning
    assert_equals_uninterrupted(resumable, out)


def test_a_crafted_pickle_is_refused_even_with_a_forged_manifest(resumable, shards, tmp_path, caplog):
    """The manifest cannot stop someone who rewrites it; the restricted unpickler still refuses the code."""
    out, newest = copy_cut(resumable, tmp_path)
    marker = tmp_path / "pwned"
    (newest / "dcp" / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    forge_manifest(newest)
    with caplog.at_level(logging.WARNING, logger="merv.train.state"):
        outcome = resume_outcome(resumable, shards, out)
    assert not marker.exists(), "resume ran code from a crafted .metadata"
    assert outcome is None, repr(outcome)
    warning = state_warnings(caplog)
    assert "refusing to unpickle io.open" in warning and "step-00000004" in warning, warning
    assert_equals_uninterrupted(resumable, out)


def test_a_crafted_value_in_the_data_file_never_runs(resumable, shards, tmp_path, caplog):
    """DCP stores non-tensor values (the optimizer's lr, betas...) with torch.save and loads them with
    ``weights_only=False``: a crafted value behind a forged manifest must still not run."""
    out, newest = copy_cut(resumable, tmp_path)
    marker = tmp_path / "pwned"
    metadata_path = newest / "dcp" / ".metadata"
    with open(metadata_path, "rb") as f:
        metadata = pickle.load(f)
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn.endswith(".lr"))
    payload = io.BytesIO()
    torch.save(Touch(marker), payload)
    data = newest / "dcp" / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(payload.getvalue())
    info.offset, info.length = offset, len(payload.getvalue())
    metadata_path.write_bytes(pickle.dumps(metadata))
    forge_manifest(newest)
    with caplog.at_level(logging.WARNING, logger="merv.train.state"):
        outcome = resume_outcome(resumable, shards, out)
    assert not marker.exists(), "resume ran code from a crafted value in the data file"
    assert outcome is None, repr(outcome)
    warning = state_warnings(caplog)
    assert "step-00000004" in warning and "step-00000002" in warning, warning
    assert_equals_uninterrupted(resumable, out)


# ------------------------------------------------------------------------------------------------------------------
def train_cmd(run, data: Path, out: Path) -> list[str]:
    config = json.dumps(run.to_dict())
    cmd = [sys.executable, "-m", "merv.cli", "train", "--config", config, "--stage", "finetune", "--data", str(data)]
    return cmd + ["--out", str(out), "--no-progress"]


def test_a_second_run_into_a_live_runs_output_is_refused(tiny_run, shards, tmp_path):
    run = stage_run(tiny_run, epochs=400, checkpoint_every=5, keep_last=1)  # long enough to be alive throughout
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        train_cmd(run, shards["finetune"], out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        deadline = time.time() + 300
        while not (work_dir(out).is_dir() and any(work_dir(out).glob("step-*"))) and time.time() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        try:
            second = subprocess.run(
                train_cmd(run, shards["finetune"], out), capture_output=True, text=True, env=env, timeout=120
            )
        except subprocess.TimeoutExpired:
            pytest.fail("the second run trained into the live run's output instead of refusing")
        assert first.poll() is None, "the first run must still be alive"
    finally:
        first.kill()
        first.wait()
    assert second.returncode != 0, "the second run trained into the live run's output: " + second.stderr[-1500:]
    assert f"PID {first.pid}" in second.stderr and socket.gethostname() in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
