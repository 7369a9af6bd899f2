"""Every named preset builds with stand-in weights of its architecture families."""

import pytest
import torch

from merv.config import available_presets, resolve_run_config
from merv.models.merv import MERV
from merv.models.standins import build_standin_weights

PAPER = [p for p in available_presets() if not p.startswith("merv-tiny")]  # merv-tiny and its grid: tests/report


def test_the_paper_presets_are_there():
    assert {"merv-frozen", "merv-full", "siglip-single", "dinov2-single", "vivit-single", "languagebind-single",
            "merv-channel-concat", "merv-sequence-concat", "merv-learnable-scalar",
            "hiera-single"} <= set(PAPER)  # fmt: skip
    full = resolve_run_config("merv-full")
    assert [s.name for s in full.train.stages] == ["align", "finetune"] and full.train.stage("align").lr == 1e-4
    frames = {e.id: e.num_frames for e in full.model.encoders}
    assert frames == {"languagebind": 16, "dinov2": 16, "vivit": 32, "siglip": 16}
    assert full.model.visual_tokens == 16 * 64
    # the original's merv-full: caption-only stage-1 text, stage 2 from stage 1's projectors only
    assert full.train.stage("align").text == "caption" and full.train.stage("finetune").init_groups == ("projectors",)
    # the original's Llama-2 vocabulary (<PAD>, 32064 rows), float32 weights, text cut to 2048 on its own
    llm = full.model.llm
    assert (llm.add_special_tokens, llm.pad_vocab_to_multiple_of) == ({"pad_token": "<PAD>"}, 64)
    assert llm.truncation == "text" and full.model.dtype == "fp32"
    for single in ("languagebind-single", "dinov2-single", "vivit-single", "siglip-single"):
        fusion = resolve_run_config(single).model.fusion  # the original keeps its cross-attention over one encoder
        assert (fusion.kind, fusion.attn_dim) == ("cross_attention", 3072), single
    seq = resolve_run_config("merv-sequence-concat").model
    assert seq.visual_tokens == 4 * 12 * 64 and seq.llm.max_length - seq.visual_tokens == 1024, "room for text"


@pytest.mark.parametrize("preset", PAPER)
def test_paper_presets_run_the_papers_recipe(preset):
    """bf16 mixed precision, activation checkpointing, FSDP full-shard for every stage (merv-full's stage 1 too),
    seed 7, and frames squashed to 224 x 224 as the original's resize-naive strategy does, except LanguageBind's: the
    original always runs LanguageBind's own transform (short side to 224, centre crop, random flip at p 0.5)."""
    run = resolve_run_config(preset)
    assert run.train.seed == 7
    for stage in run.train.stages:
        assert (stage.mixed_precision, stage.activation_checkpointing, stage.fsdp) == ("bf16", True, "full_shard")
    for e in run.model.encoders:
        own = (e.resize, e.hflip) == ("crop", 0.5) and e.mean is e.std is None  # CLIP's stats: see transforms
        assert own if e.kind == "languagebind_video" else (e.resize, e.hflip) == ("squash", 0.0), e.id
    assert {e.image_size for e in run.model.encoders} == {224}


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
    dropped = {n: e.prefix_tokens for n, e in model.encoders.items()}
    expected = {"languagebind": 1, "dinov2": 5, "vivit": 1, "siglip": 0, "hiera": 0}  # CLS; CLS + 4 registers; ...
    assert dropped == {n: expected[n] for n in dropped}


def test_qwen_style_llm_without_bos(tmp_path):
    """A Qwen2 LLM (no BOS, ChatML chat template): visual tokens go first and generation works."""
    run = resolve_run_config(
        "siglip-single", {"model": {"llm": {"arch": "qwen2", "prompt_format": "chat-template", "max_length": 2048}}}
    )
    run = build_standin_weights(run, tmp_path)
    model = MERV.from_config(run.model).eval()
    assert type(model.llm).__name__ == "Qwen2ForCausalLM" and model.tokenizer.bos_token_id is None
    builder = model.get_prompt_builder()
    builder.add_turn("human", "<video>\nWhat colour is the moving shape?")
    assert builder.get_prompt().startswith("<|im_start|>user\nWhat colour")
    videos = {"siglip": torch.randn(2, 16, 3, 224, 224)}
    answers = model.generate_batch(videos, [builder.get_prompt()] * 2, max_new_tokens=3)
    assert len(answers) == 2


def test_videomae_encoder(tmp_path):
    """hf_video also takes VideoMAE (no CLS, integer tubelet size)."""
    run = resolve_run_config("vivit-single", {"model": {"encoders": {"vivit": {"arch": "videomae", "num_frames": 16}}}})
    run = build_standin_weights(run, tmp_path)
    model = MERV.from_config(run.model)
    enc = model.encoders["vivit"]
    assert type(enc.model).__name__ == "VideoMAEModel" and (enc.temporal_positions, enc.tokens_per_frame) == (8, 196)
    with torch.no_grad():
        visual, _ = model.encode({"vivit": torch.randn(1, 16, 3, 224, 224)})
    assert visual.shape == (1, 1024, 64)


@pytest.mark.parametrize(
    ("preset", "encoder", "arch", "prefix"),
    [("siglip-single", "siglip", "siglip_vision_model", 0), ("dinov2-single", "dinov2", "dinov2_with_registers", 5)],
)
def test_transformers_image_encoders(tmp_path, preset, encoder, arch, prefix):
    """hf_image: the same encoders through transformers instead of timm (CLS and registers dropped)."""
    patch = {"kind": "hf_image", "arch": arch, "model_kwargs": {}}
    run = build_standin_weights(resolve_run_config(preset, {"model": {"encoders": {encoder: patch}}}), tmp_path)
    model = MERV.from_config(run.model)
    enc = model.encoders[encoder]
    assert enc.prefix_tokens == prefix and enc.tokens_per_frame == (224 // (16 if "siglip" in arch else 14)) ** 2
    with torch.no_grad():
        out = enc(torch.randn(1, 2, 3, 224, 224))
    assert out.shape == (1, 2, enc.tokens_per_frame, enc.embed_dim)
