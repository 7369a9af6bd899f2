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

from tests.helpers import REPO


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
def spm_model() -> Path:
    """A real SentencePiece model (Mistral-7B v0.1's, from the mistral-common wheel; cached under .cache/)."""
    from tests.spm import sentencepiece_model

    return sentencepiece_model(REPO / ".cache" / "test-assets")


@pytest.fixture(scope="session", params=["legacy", "metaspace"])
def spm_llm(request, spm_model, tmp_path_factory) -> Path:
    """A tiny Llama folder whose tokenizer is the real SentencePiece model, in each tokenizer.json form."""
    from tests.spm import build_llm, build_tokenizer

    out = tmp_path_factory.mktemp(f"spm-{request.param}")
    return build_llm(build_tokenizer(spm_model, request.param, out), out)


@pytest.fixture(scope="session")
def unequal_shards(synth_dir, tmp_path_factory) -> Path:
    """Stage-2 shards of deliberately unequal sizes (3, 3, 2, 2, 2 samples): two sharding runs of the 12 samples
    at different target sizes, put together in one folder with one manifest."""
    import json

    from merv.data.shards import ShardSettings, collect_items, read_manifest, write_shards

    items = collect_items(synth_dir / "train" / "finetune.json")
    root = tmp_path_factory.mktemp("unequal")
    out, shards = root / "shards", []
    out.mkdir()
    for part, (lo, hi, target) in enumerate([(0, 6, 400_000), (6, 12, 250_000)]):
        settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=target, frame_format="npy")
        write_shards(items[lo:hi], root / f"part{part}", settings)
        for shard in read_manifest(root / f"part{part}")["shards"]:
            name = f"shard-{len(shards):06d}.tar"
            (root / f"part{part}" / shard["name"]).rename(out / name)
            shards.append({**shard, "name": name})
    manifest = {**read_manifest(root / "part1"), "shards": shards, "samples": sum(s["samples"] for s in shards)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert [s["samples"] for s in shards] == [3, 3, 2, 2, 2]
    return out


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
