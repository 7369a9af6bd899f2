"""Every named preset builds with stand-in weights of its architecture families."""

import pytest
import torch

from merv.config import available_presets, resolve_run_config
from merv.models.merv import MERV
from merv.models.standins import build_standin_weights

PAPER = [p for p in available_presets() if p != "merv-tiny"]


def test_the_paper_presets_are_there():
    assert {"merv-frozen", "merv-full", "siglip-single", "dinov2-single", "vivit-single", "languagebind-single",
            "merv-channel-concat", "merv-sequence-concat", "merv-learnable-scalar"} <= set(PAPER)  # fmt: skip
    full = resolve_run_config("merv-full")
    assert [s.name for s in full.train.stages] == ["align", "finetune"] and full.train.stage("align").lr == 1e-4
    frames = {e.id: e.num_frames for e in full.model.encoders}
    assert frames == {"languagebind": 16, "dinov2": 16, "vivit": 32, "siglip": 16}
    assert full.model.visual_tokens == 16 * 64 == resolve_run_config("merv-sequence-concat").model.visual_tokens // 4


@pytest.mark.parametrize("preset", PAPER)
def test_preset_builds_with_standins(preset, tmp_path):
    run = build_standin_weights(resolve_run_config(preset), tmp_path)
    model = MERV.from_config(run.model)
    videos = {n: torch.randn(1, e.num_frames, 3, e.image_size, e.image_size) for n, e in model.encoders.items()}
    with torch.no_grad():
        visual, _ = model.encode(videos)
    assert visual.shape == (1, run.model.visual_tokens, model.llm.get_input_embeddings().embedding_dim)
    # the stand-ins are the real families: a timm SigLIP/DINOv2 ViT, a transformers ViViT, a Llama LLM
    assert type(model.llm).__name__ == "LlamaForCausalLM"
