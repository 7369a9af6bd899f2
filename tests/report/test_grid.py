"""The merv-tiny ablation grid as configuration: presets build, the config resolves, Snakemake plans the grid."""

import subprocess
import sys

import pytest
import torch
import yaml

from merv.config import resolve_run_config
from merv.models.merv import MERV
from tests.helpers import REPO

CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
GRID = {
    "merv-tiny": ("cross_attention", ["vit", "vivit"], 64),
    "merv-tiny-appearance": ("single", ["vit"], 64),
    "merv-tiny-motion": ("single", ["vivit"], 64),
    "merv-tiny-channel-concat": ("channel_concat", ["vit", "vivit"], 64),
    "merv-tiny-learnable-scalar": ("learnable_scalar", ["vit", "vivit"], 64),
    "merv-tiny-sequence-concat": ("sequence_concat", ["vit", "vivit"], 128),
}


@pytest.mark.parametrize("preset", GRID)
def test_grid_preset_builds_on_merv_tiny(preset, tiny_run):
    fusion, encoders, tokens = GRID[preset]
    run = resolve_run_config(preset)
    base = resolve_run_config("merv-tiny")
    assert (run.model.fusion.kind, [e.id for e in run.model.encoders], run.model.visual_tokens) == GRID[preset]
    assert run.train == base.train and run.model.llm == base.model.llm and run.model.projector == base.model.projector
    same = {e.id: e for e in base.model.encoders}
    assert all(e == same[e.id] for e in run.model.encoders), "a grid encoder differs from merv-tiny's"

    weights = {e.id: e.weights for e in tiny_run.model.encoders}  # the session's tiny weights
    built = resolve_run_config(
        preset,
        {
            "model": {
                "encoders": {e: {"weights": weights[e]} for e in encoders},
                "llm": {"weights": tiny_run.model.llm.weights},
            }
        },
    )
    model = MERV.from_config(built.model).eval()
    videos = {n: torch.randn(2, e.num_frames, 3, e.image_size, e.image_size) for n, e in model.encoders.items()}
    with torch.no_grad():
        visual, w = model.encode(videos)
    assert visual.shape == (2, tokens, model.llm.get_input_embeddings().embedding_dim)
    assert (w is not None) == (fusion in ("cross_attention", "learnable_scalar", "single"))


def test_config_models_resolve_with_pretrained_encoders():
    """Every grid model of the config loads both encoders from the pretrain stage, the rest from its built weights."""
    from merv.pipeline import model_run, report_models

    grid = report_models(CONFIG)
    assert set(grid) <= set(CONFIG["pipeline"]["models"])
    presets = set()
    for name in grid:
        run = model_run(CONFIG, name)
        assert all(e.weights.startswith("data/weights/pretrained/") for e in run.model.encoders), name
        assert run.model.llm.weights == f"data/weights/{name}/built/llm"
        presets.add(CONFIG["models"][name]["preset"])
    assert presets == set(GRID)
    assert set(CONFIG["report"]["main"]) == {"merv_tiny", "tiny_appearance", "tiny_motion"}


@pytest.mark.slow  # a real Snakemake dry run of the grid
def test_snakemake_plans_the_grid_through_the_tables(tmp_path):
    """`snakemake -n` from an empty folder plans the default target: every grid model trained and evaluated, the
    two encoders pretrained once (not per model), one table job."""
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "config.yaml"), "-n"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    from merv.pipeline import model_run
    from tests.helpers import planned_jobs

    jobs = planned_jobs(res.stdout + res.stderr)
    n = len(CONFIG["pipeline"]["models"])
    benches = len(CONFIG["data"]["benchmarks"])
    assert jobs["pretrain_encoder"] == 2 and jobs["build_tiny_weights"] == n and jobs["make_tables"] == 1
    seeds = len(CONFIG["report"]["seeds"])  # every grid model is reported: each trains under every seed
    assert jobs["train_stage"] == 2 * n * seeds and jobs["eval_benchmark"] == benches * n * seeds
    assert jobs["collect_eval"] == n * seeds and jobs["collect_seeds"] == n
    caches = sum(2 * len(model_run(CONFIG, m).model.encoders) for m in CONFIG["pipeline"]["models"])
    assert jobs["gather_features"] == caches, "once per split and encoder, not per seed"
