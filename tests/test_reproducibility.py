"""Bitwise-reproducible CPU runs: a training stage gives the same bytes whatever cores Snakemake grants it and
whatever runs beside it, because its threads come from config `compute`, not from the scheduler."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merv.config import parse_config
from merv.settings import ComputeSection

REPO = Path(__file__).resolve().parents[1]


def small_config() -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["synth"].update(train_videos=32, eval_videos=4)  # two steps of 16: the full batch size
    cfg["shards"]["target_size"] = "200KB"
    for model in ("merv_tiny", "tiny_motion"):  # random encoders: no pretraining, lean
        cfg["models"][model]["pretrained_encoders"] = {}
    cfg["pipeline"]["models"] = ["merv_tiny", "tiny_motion"]
    cfg["report"] = {"main": ["merv_tiny"], "fusion_ablation": [], "fusion_weights": None}
    # one thread a job, so that two training jobs fit side by side on --cores 2
    cfg["compute"] = {"threads": 1, "isa": "native", "loader_workers": 1}
    return cfg


def snakemake(workdir: Path, cores: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    res = subprocess.run([*cmd, "--cores", str(cores), *args], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def weights_digest(workdir: Path, model: str) -> str:
    return hashlib.sha256(
        (workdir / "results" / model / "seed-0" / "train" / "align" / "model.safetensors").read_bytes()
    ).hexdigest()


def ran_side_by_side(log: str) -> bool:
    """Whether the Snakemake log shows two jobs started before the first one finished."""
    events = re.findall(r"^(?:local)?(rule train_stage:|Finished jobid)", log, re.M)
    return events[:2] == ["rule train_stage:", "rule train_stage:"]


@pytest.mark.slow
def test_training_stage_gives_the_same_weights_on_1_core_and_beside_another_job_on_2(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(small_config()))
    merv_tiny, motion = "results/merv_tiny/seed-0/train/align", "results/tiny_motion/seed-0/train/align"
    snakemake(tmp_path, 2, merv_tiny, motion)  # data, pretrained encoders, weights, feature caches

    snakemake(tmp_path, 1, merv_tiny, "--forcerun", "train_stage")  # alone, one core granted
    alone = weights_digest(tmp_path, "merv_tiny")
    res = snakemake(tmp_path, 2, merv_tiny, motion, "--forcerun", "train_stage")  # two cores, another job beside
    assert weights_digest(tmp_path, "merv_tiny") == alone
    assert ran_side_by_side(res.stdout + res.stderr), "the two training jobs did not overlap"


def test_compute_config_is_checked():
    """(Its defaults against the schema and the CLI: tests/test_settings.py, as every section's.)"""
    assert parse_config(ComputeSection, {}, "compute") == ComputeSection()
    with pytest.raises(ValueError, match="compute.threads must be >= 1"):
        parse_config(ComputeSection, {"threads": 0}, "compute")
    with pytest.raises(ValueError, match=r"compute.isa: 'avx512' is not one of \['native', 'avx2'\]"):
        parse_config(ComputeSection, {"isa": "avx512"}, "compute")


def test_cli_threads_override_what_the_scheduler_exported(tmp_path):
    """`merv --threads N` computes on N threads even when the environment says otherwise (Snakemake exports
    OMP_NUM_THREADS = the cores it grants), and pins the CPU code path before torch runs anything."""
    code = (
        "import sys, torch\n"
        "import merv.cli as cli\n"
        "cli.cmd_report = lambda args: print(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(), "
        "torch.are_deterministic_algorithms_enabled())\n"
        "sys.exit(cli.main(['report', '--spec', '{}', '--out', 'x', '--threads', '3', '--isa', 'avx2']))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["3", "AVX2", "True"]
