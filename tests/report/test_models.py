"""What the report measures on checkpoints: FLOPs and visual tokens per variant, fusion weights per question type."""

import dataclasses

import pytest
import torch

from merv.checkpoint import save_checkpoint
from merv.config import resolve_run_config
from merv.models.merv import MERV
from merv.report.config import report_config_from_dict
from merv.report.models import fusion_weights_by_type, model_costs


def checkpoint(tiny_run, preset: str, out):
    """An (untrained) checkpoint of a grid preset on the session's tiny weights."""
    run = resolve_run_config(preset)
    weights = {e.id: e for e in tiny_run.model.encoders}
    model_cfg = dataclasses.replace(
        run.model, encoders=tuple(weights[e.id] for e in run.model.encoders), llm=tiny_run.model.llm
    )
    run = dataclasses.replace(run, model=model_cfg)
    torch.manual_seed(0)
    save_checkpoint(MERV.from_config(run.model), run, out, {"trained_groups": ["projectors", "fusion"]})
    return str(out)


@pytest.fixture(scope="module")
def spec(tiny_run, shards, synth_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    presets = {"fused": "merv-tiny", "motion": "merv-tiny-motion", "seq": "merv-tiny-sequence-concat"}
    return {
        "models": [
            {"name": n, "runs": [{"seed": 0, "results": "unused", "checkpoint": checkpoint(tiny_run, p, root / n)}]}
            for n, p in presets.items()
        ],
        "benchmarks": [
            {
                "name": "synth_mcq",
                "data": str(synth_dir / "eval_data" / "synth_mcq"),
                "shards": str(shards["synth_mcq"]),
            }
        ],
        "main": ["fused"],
        "fusion_ablation": ["fused", "motion", "seq"],
        "fusion_weights_model": "fused",
        "fusion_weights_benchmark": "synth_mcq",
    }


def test_costs_count_visual_tokens_and_flops(spec):
    costs = model_costs(report_config_from_dict(spec))
    assert costs["fused"]["visual_tokens"] == 64 and costs["seq"]["visual_tokens"] == 128
    assert costs["fused"]["encoders"] == ["vit", "vivit"] and costs["motion"]["fusion"] == "single"
    # one encoder less is cheaper; twice the visual tokens in the LLM costs more than fusing them
    assert costs["motion"]["gflops"] < costs["fused"]["gflops"] < costs["seq"]["gflops"]


def test_fusion_weights_per_question_type(spec, synth_dir):
    import json

    rows = fusion_weights_by_type(report_config_from_dict(spec), batch_size=4)
    questions = json.loads((synth_dir / "eval_data" / "synth_mcq" / "test_q.json").read_text())
    types = {q["question_type"] for q in questions}
    assert [r[0] for r in rows[::2]] == ["all", *sorted(types)]
    assert [r[1] for r in rows[:2]] == ["vit", "vivit"]
    for i in range(0, len(rows), 2):
        assert rows[i][2] + rows[i + 1][2] == pytest.approx(1.0, abs=2e-4)  # mean weights of a type sum to one
    assert rows[0][4] == len(questions)
    assert sum(r[4] for r in rows[2::2]) == len(questions)


def test_fusion_without_weights_is_refused(spec):
    bad = dict(spec, fusion_weights_model="seq")
    with pytest.raises(ValueError, match="model 'seq' \\(fusion 'sequence_concat'\\) has no per-sample weights"):
        fusion_weights_by_type(report_config_from_dict(bad))
