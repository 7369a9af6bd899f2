"""DVC over the configured models: `dvc repro` from a copy of the repository, `dvc status` after an edit, a second
model added to the config, and a push/pull round trip through the default (local folder) remote into a fresh clone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tests.test_pipeline import small_config as pipeline_config

pytestmark = pytest.mark.slow


def small_config() -> dict:
    """test_pipeline's small config on one seed (its per-seed stages and outputs: tests/test_workflow.py)."""
    cfg = pipeline_config()
    cfg["report"]["seeds"] = [0]
    return cfg


def run(cmd: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """``cmd`` with HOME in a temp folder: the default remote (~/.cache/merv/dvc-remote) lands there."""
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        HOME=str(home),
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


def commit(repo: Path, home: Path, message: str) -> None:
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message]):
        res = run(cmd, repo, home)
        assert res.returncode == 0, res.stdout + res.stderr


def write_config(repo: Path, cfg: dict) -> None:
    """The config, and dvc.yaml made from it as a user makes it after an edit (`merv dvc-yaml`)."""
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "merv", "dvc-yaml"], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def changed_stages(repo: Path, home: Path) -> set[str]:
    res = run(["dvc", "status", "--json"], repo, home)
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def clone(tmp_path_factory, home) -> Path:
    """A copy of the project's files (as git sees them) in its own git repository, reproduced once by `dvc repro`."""
    dest = tmp_path_factory.mktemp("clone") / "merv"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    write_config(dest, small_config())  # two models: dvc.yaml made from it (merv dvc-yaml)
    assert run(["git", "init", "-q"], dest, home).returncode == 0
    commit(dest, home, "copy")
    res = run(["dvc", "repro"], dest, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    commit(dest, home, "reproduced")
    return dest


def test_dvc_repro_runs_the_pipeline_and_tracks_params(clone, home):
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], clone, home).stdout)
    assert "synth_mcq" in json.dumps(metrics) and "accuracy" in json.dumps(metrics)
    assert changed_stages(clone, home) == set()
    stages = run(["dvc", "stage", "list", "--name-only"], clone, home).stdout.split()
    assert stages == ["synth", "shards", "models", "tables"]
    assert "results/tables/metrics.json" in json.dumps(metrics), "the tables are a metric of dvc repro"
    assert (clone / "results" / "tables" / "main.md").is_file() and (
        clone / "results/tables/fusion_weights.png"
    ).is_file()


def changed_params(repo: Path, home: Path, stage: str) -> set[str]:
    """The config keys ``dvc status`` finds changed for ``stage``."""
    res = run(["dvc", "status", "--json", stage], repo, home)
    assert res.returncode == 0, res.stderr
    changed = set()
    for entry in json.loads(res.stdout).get(stage, []):
        if isinstance(entry, dict):
            for deps in entry.get("changed deps", {}).values():
                changed |= set(deps) if isinstance(deps, dict) else set()
    return changed


def test_status_after_an_edit_names_the_stages_and_params_snakemake_would_rerun(clone, home):
    cfg = small_config()
    try:
        cfg["eval"]["max_new_tokens"] = 4  # Snakemake: the evaluation jobs only
        write_config(clone, cfg)
        assert changed_stages(clone, home) == {"models"}
        assert changed_params(clone, home, "models") == {"eval"}
        cfg["models"]["merv_tiny"]["overrides"]["train"]["stages"]["finetune"]["lr"] = 1e-3  # + train_stage
        write_config(clone, cfg)
        assert changed_stages(clone, home) == {"models"}
        assert changed_params(clone, home, "models") == {"eval", "models.merv_tiny"}
        cfg["models"]["merv_full"]["overrides"] = {"train": {"stages": {"align": {"lr": 1e-3}}}}  # not selected
        write_config(clone, cfg)
        assert changed_stages(clone, home) == {"models"}
        assert changed_params(clone, home, "models") == {"eval", "models.merv_tiny"}
        cfg["report"]["main"] = ["tiny_motion", "merv_tiny"]  # the tables only
        write_config(clone, cfg)
        assert changed_stages(clone, home) == {"models", "tables"}
        assert changed_params(clone, home, "tables") == {"report"}
    finally:
        write_config(clone, small_config())
    assert changed_stages(clone, home) == set()


def test_a_second_model_is_trained_and_evaluated_by_dvc_repro(clone, home):
    tiny_meta = (clone / "results" / "merv_tiny" / "seed-0" / "train" / "finetune" / "meta.json").read_text()
    cfg = small_config()
    cfg["models"]["merv_tiny_b"] = {
        "preset": "merv-tiny",
        "weights": "tiny",
        "overrides": {"train": {"stages": {"finetune": {"epochs": 1, "lr": 1e-3}}}},
    }
    cfg["pipeline"]["models"].append("merv_tiny_b")
    write_config(clone, cfg)
    # the new model's stages, and sharding (which builds the shard sets of the selected models: here, nothing new)
    assert changed_stages(clone, home) == {"shards", "models"}
    assert changed_params(clone, home, "models") == {"models.merv_tiny_b"}
    res = run(["dvc", "repro"], clone, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((clone / "results" / "merv_tiny_b" / "eval.json").read_text())
    assert result["model"] == "merv_tiny_b" and set(result["benchmarks"]) == {"synth_mcq", "synth_open"}
    assert (clone / "results" / "merv_tiny" / "seed-0" / "train" / "finetune" / "meta.json").read_text() == tiny_meta
    assert changed_stages(clone, home) == set()
    assert "merv_tiny_b" in run(["dvc", "metrics", "show"], clone, home).stdout
    commit(clone, home, "second model")


def test_push_then_pull_into_a_fresh_clone_restores_everything(clone, home, tmp_path):
    res = run(["dvc", "push"], clone, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (home / ".cache" / "merv" / "dvc-remote" / "files").is_dir(), "the default remote is a local folder"
    fresh = tmp_path / "fresh"
    assert run(["git", "clone", "-q", str(clone), str(fresh)], tmp_path, home).returncode == 0
    assert not (fresh / "results").exists() or not any((fresh / "results").glob("*/seed-*/train"))
    res = run(["dvc", "pull"], fresh, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    restored = [
        "data/shards/small/train/finetune/manifest.json",
        "data/weights/merv_tiny/built/llm/config.json",
        "results/merv_tiny/seed-0/train/finetune/model.safetensors",
        "results/merv_tiny/seed-0/eval/synth_mcq.json",
        "results/merv_tiny/eval.json",
        "data/weights/pretrained/motion/model.safetensors",
        "results/tables/main.md",
    ]
    for rel in restored:
        assert (fresh / rel).is_file(), rel
    assert changed_stages(fresh, home) == set()
    res = run(["dvc", "repro"], fresh, home)
    assert res.returncode == 0 and "Running stage" not in res.stdout, res.stdout[-3000:]
