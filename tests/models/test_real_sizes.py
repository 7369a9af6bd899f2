"""Every paper preset at full size, on the meta device, from the real checkpoints' configurations (tests/data/hub,
sources in SOURCES.md), without downloading a weight: each encoder's loader takes the real checkpoint's tensor names
and shapes (produced by the reference code that writes them: LanguageBind's own, timm's, the hiera package's,
transformers'), the visual tokens reach the LLM in the preset's number, and the memory planner runs on the real sizes.

Only the reading of weight files is replaced (by the checkpoint's names and shapes on the meta device); config
checks, key mapping, strictness and timm's checkpoint filter (DINOv2's 518 -> 224 position embedding) run as they do
for real weights. This is the test that catches a preset the real checkpoint does not fit (LanguageBind_Video_merge
is built for 8-frame clips; MERV feeds it 16) and a loader too strict for what the real folder holds (its
``position_ids`` buffer).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from merv.config import EncoderConfig, available_presets, resolve_run_config
from tests.reference.parity import languagebind_manifest
from tests.reference.venvs import reference_python

HUB = Path(__file__).resolve().parents[1] / "data" / "hub"
PAPER = [p for p in available_presets() if not p.startswith("merv-tiny")]
FOLDERS = {
    "languagebind_video": "LanguageBind_Video_merge",
    "hf_video": "vivit-b-16x2-kinetics400",
    "hiera_video": "hiera_base_plus_16x224.mae_k400_ft_k400",
}
LLAMA2_7B_PARAMS = 6_738_415_616  # Llama-2-7B's published parameter count (32000-row embeddings, untied head)


def planner():
    """``memory_plan`` of benchmarks/train_step.py (the script prints it with ``--plan``)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.memory_plan


def meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


@pytest.fixture(scope="module")
def languagebind_checkpoint(tmp_path_factory) -> dict[str, list[int]]:
    """Names and shapes of what LanguageBind's own code saves for LanguageBind_Video_merge's config."""
    tmp = tmp_path_factory.mktemp("lb-manifest")
    config = HUB / FOLDERS["languagebind_video"] / "config.json"
    return languagebind_manifest(reference_python("languagebind"), config, tmp / "manifest.json")


@pytest.fixture(scope="module")
def llm_folder(spm_model, tmp_path_factory) -> Path:
    """Llama-2-7b-hf's config with a real 32000-piece SentencePiece tokenizer (no weights)."""
    from tests.spm import build_tokenizer

    out = tmp_path_factory.mktemp("llama2")
    build_tokenizer(spm_model, "legacy", out)
    shutil.copy(HUB / "Llama-2-7b-hf" / "config.json", out / "config.json")
    return out


@pytest.fixture
def real_loaders(monkeypatch, languagebind_checkpoint):
    """Weight files replaced by the real checkpoints' names and shapes on the meta device (see the module doc)."""
    import timm
    import timm.models._builder as timm_builder
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    import merv.models.languagebind as languagebind

    monkeypatch.setattr(languagebind, "read_checkpoint", lambda path: meta_state(languagebind_checkpoint))

    def timm_checkpoint(arch):
        """The hub file of a timm model: the architecture at its pretrained config's size, no classifier."""
        pcfg = timm.models.get_pretrained_cfg(arch).to_dict()
        with torch.device("meta"):
            native = timm.create_model(arch, pretrained=False, num_classes=pcfg["num_classes"],
                                       img_size=pcfg["input_size"][-1])  # fmt: skip
        return native.state_dict()

    current = {}
    original_create = timm.create_model

    def create_model(arch, *args, **kwargs):
        current["arch"] = arch
        return original_create(arch, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(timm_builder, "load_state_dict", lambda *a, **k: dict(timm_checkpoint(current["arch"])))
    # merv.integrity reads the timm file's header before and after timm loads it: the same checkpoint's names/shapes
    import merv.integrity as integrity

    def timm_header(path):  # real_run names a timm encoder's stand-in file after its architecture
        state = timm_checkpoint(Path(path).name.removesuffix(".safetensors"))
        return {k: integrity.TensorInfo("F32", tuple(t.shape), 0, 0) for k, t in state.items()}

    monkeypatch.setattr(integrity, "read_safetensors_header", timm_header)

    def from_config(path, **kwargs):
        return AutoConfig.from_pretrained(path)

    def from_pretrained(auto):
        def load(path, output_loading_info=False, **kwargs):  # the architecture only: nothing to report as missing
            model = auto.from_config(from_config(path))
            return (
                (model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []})
                if output_loading_info
                else model
            )

        return load

    monkeypatch.setattr(AutoModel, "from_pretrained", from_pretrained(AutoModel))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained(AutoModelForCausalLM))
    if importlib.util.find_spec("hiera") is not None:
        import merv.models.hiera as hiera

        def hiera_checkpoint(path):
            with torch.device("meta"):
                return hiera.import_hiera()(**json.loads((Path(path) / "config.json").read_text())).state_dict()

        monkeypatch.setattr(hiera, "read_checkpoint", hiera_checkpoint)
        # Hiera's constructor reads its drop-path rates with .item(), which a meta tensor cannot give: keep them on CPU
        linspace = torch.linspace
        monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))


def real_run(preset: str, llm: Path):
    """The preset with every folder pointing at the real configurations; a timm encoder's file is an empty stand-in
    named after its architecture (real_loaders gives its header and tensors from timm's registry)."""
    run = resolve_run_config(preset)
    folder = {}
    for e in run.model.encoders:
        if e.kind in FOLDERS:
            folder[e.id] = HUB / FOLDERS[e.kind]
        else:
            folder[e.id] = llm / f"{e.arch}.safetensors"
            folder[e.id].touch()
    encoders = {name: {"weights": str(path)} for name, path in folder.items()}
    return resolve_run_config(preset, {"model": {"encoders": encoders, "llm": {"weights": str(llm)}}})


@pytest.mark.parametrize("preset", PAPER)
def test_paper_preset_at_full_size(preset, real_loaders, llm_folder):
    from merv.models.merv import MERV

    run = real_run(preset, llm_folder)
    with torch.device("meta"):
        model = MERV.from_config(run.model)
        videos = {n: torch.empty(1, e.num_frames, 3, e.image_size, e.image_size) for n, e in model.encoders.items()}
        outputs = {n: e(videos[n]) for n, e in model.encoders.items()}
        visual, _ = model.encode(videos)
    expected = {  # [T', N, C] each encoder hands its projector, from the checkpoints' architectures
        "languagebind": (16, 256, 1024), "dinov2": (16, 256, 1024), "vivit": (16, 196, 768), "siglip": (16, 196, 768),
        "hiera": (16, 49, 896),
    }  # fmt: skip
    for name, out in outputs.items():
        assert tuple(out.shape) == (1, *expected[name]), name
        enc = model.encoders[name]
        assert (enc.temporal_positions, enc.tokens_per_frame, enc.embed_dim) == expected[name], name
    assert tuple(visual.shape) == (1, run.model.visual_tokens, 4096)
    if preset in ("merv-full", "merv-frozen"):
        assert run.model.visual_tokens == 1024
    llm_params = sum(p.numel() for p in model.llm.parameters())
    # plus the original's <PAD> and padding to 64: 32064 rows in the embeddings and the untied head
    assert llm_params == LLAMA2_7B_PARAMS + 2 * 64 * 4096
    assert model.llm.get_input_embeddings().weight.shape == (32064, 4096) == model.llm.lm_head.weight.shape
    plan = planner()(run, 128, model=model)
    trained = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoders."))
    frozen = sum(p.numel() for p in model.encoders.parameters())
    row = next(r for r in plan if r["batch"] == 8 and r["checkpointing"])
    tokens = 8 * (128 + run.model.visual_tokens)
    gib = (18 * trained + 6 * frozen + tokens * 4096 * (2 * 32 + 34) + 8 * 64 * 32000 * 4) / 2**30
    assert row["estimated_gib"] == round(gib, 1) and trained > LLAMA2_7B_PARAMS


def test_the_real_languagebind_checkpoint_loads_at_its_8_frames_and_the_presets_16(
    real_loaders, languagebind_checkpoint
):
    """LanguageBind_Video_merge as its own code saves it (with vision_model.embeddings.position_ids) loads at 8 frames
    and at 16 (two clips of 8); its temporal embedding has 8 positions."""
    from merv.models.encoders import build_encoder

    assert languagebind_checkpoint["vision_model.encoder.layers.0.temporal_embedding"] == [1, 8, 1024]
    assert "vision_model.embeddings.position_ids" in languagebind_checkpoint
    folder = HUB / FOLDERS["languagebind_video"]
    for frames in (8, 16):
        cfg = EncoderConfig(id="languagebind", kind="languagebind_video", weights=str(folder), num_frames=frames,
                            image_size=224, feature_layer=-2)  # fmt: skip
        with torch.device("meta"):
            enc = build_encoder(cfg)
        assert (enc.temporal_positions, enc.clip_frames, len(enc.temporal)) == (frames, 8, 23)


def test_vivit_classification_checkpoint_covers_the_model_merv_builds():
    """google/vivit-b-16x2-kinetics400 is a VivitForVideoClassification checkpoint: transformers strips its
    ``vivit.`` prefix; every tensor of the VivitModel merv builds is in it, with its shape, except the pooler (unused:
    merv takes the tokens, not the pooled output)."""
    from transformers import AutoConfig, VivitForVideoClassification, VivitModel

    config = AutoConfig.from_pretrained(HUB / FOLDERS["hf_video"])
    with torch.device("meta"):
        checkpoint = VivitForVideoClassification(config).state_dict()
        ours = VivitModel(config).state_dict()
    stripped = {k.removeprefix("vivit."): v.shape for k, v in checkpoint.items() if k.startswith("vivit.")}
    missing = sorted(k for k in ours if k not in stripped)
    assert missing == ["pooler.dense.bias", "pooler.dense.weight"]
    assert all(stripped[k] == v.shape for k, v in ours.items() if k in stripped)
