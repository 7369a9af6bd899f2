"""Shared fixtures: a tiny synthetic dataset and tiny weights built once per session, in a temp folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(weights_dir: Path) -> dict:
    """Point merv-tiny's weight paths into ``weights_dir`` (overrides patch encoders by id)."""
    return {
        "model": {
            "encoders": {
                "vit": {"weights": str(weights_dir / "vit" / "model.safetensors")},
                "vivit": {"weights": str(weights_dir / "vivit")},
            },
            "llm": {"weights": str(weights_dir / "llm")},
        }
    }


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from merv.data.synth import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, seed=1, train_videos=12, eval_videos=6)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The merv-tiny run config with freshly built weights in a temp folder."""
    from merv.config import resolve_run_config
    from merv.data.synth import tokenizer_corpus
    from merv.models.tiny import build_tiny_weights

    weights = tmp_path_factory.mktemp("weights")
    run = resolve_run_config("merv-tiny", tiny_overrides(weights))
    build_tiny_weights(run, tokenizer_corpus(), seed=0)
    return run


@pytest.fixture(scope="session")
def tiny_model(tiny_run):
    from merv.models.merv import MERV

    torch.manual_seed(0)
    return MERV.from_config(tiny_run.model)


@pytest.fixture(scope="session")
def shards(synth_dir, tmp_path_factory, tiny_run) -> dict[str, Path]:
    """Shard folders of the tiny dataset (lossless frames, ~4 samples a shard): training splits and benchmarks."""
    from merv.data.shards import ShardSettings, collect_items, write_shards

    out = tmp_path_factory.mktemp("shards")
    settings = ShardSettings(
        frame_counts=tuple(e.num_frames for e in tiny_run.model.encoders),
        size=max(e.image_size for e in tiny_run.model.encoders),
        target_bytes=500_000,
        frame_format="npy",
    )
    sources = {
        "align": synth_dir / "train" / "align.json",
        "finetune": synth_dir / "train" / "finetune.json",
        "synth_mcq": synth_dir / "eval_data" / "synth_mcq",
        "synth_open": synth_dir / "eval_data" / "synth_open",
    }
    result = {}
    for name, src in sources.items():
        write_shards(collect_items(src), out / name, settings, strict=True)
        result[name] = out / name
    return result


@pytest.fixture(scope="session")
def slurm():
    """A real single-node Slurm cluster (slurmctld, slurmd, slurmdbd + MariaDB, munge, 2 fake GPUs), started once
    per test session: its ports are fixed, so one cluster serves every Slurm test. Yields the environment to run
    Slurm commands with (SLURM_CONF set, this interpreter's bin first on PATH)."""
    # munge and MariaDB (running as mysql) need a base dir whose parents others may enter: not pytest's 0700 tmp
    base = Path(tempfile.mkdtemp(prefix="merv-slurm-test-", dir="/tmp"))
    base.chmod(0o755)
    env = dict(os.environ, MERV_SLURM_DIR=str(base))
    script = REPO / "scripts" / "slurm-cluster"
    res = subprocess.run([str(script), "start"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    key, value = res.stdout.strip().splitlines()[-1].removeprefix("export ").split("=", 1)
    env[key] = value.strip("'\"")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    yield env
    subprocess.run([str(script), "stop"], env=env, timeout=300)
    shutil.rmtree(base, ignore_errors=True)
