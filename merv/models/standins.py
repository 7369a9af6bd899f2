"""Stand-in weights: any preset's architecture families at toy sizes, built locally.

Tests (and users without the real weights) build every named preset this way: the same timm architecture, the same
transformers model type and the same LLM family as the real checkpoints, shrunk to a few thousand parameters, saved
where a returned copy of the config points, and loaded back through the paths real weights take.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merv.config import RunConfig, run_config_from_dict
from merv.data.synth import tokenizer_corpus
from merv.models.languagebind import write_standin
from merv.models.tiny import save_module, train_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LANGUAGEBIND_CLIP = 8  # vision_config.num_frames of LanguageBind_Video_merge
HIERA_CLIP = 16  # input_size[0] of the video Hiera checkpoints
TOY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _hf_vision_config(model_type: str, image_size: int, num_frames: int):
    from transformers import AutoConfig

    extra = {"image_size": image_size}
    if model_type in ("vivit", "videomae"):
        extra["num_frames"] = num_frames
    if model_type.startswith("dinov2"):  # DINOv2 checkpoints use 14-pixel patches
        extra = {**extra, "mlp_ratio": 2, "patch_size": 14}
        return AutoConfig.for_model(model_type, **{k: v for k, v in TOY.items() if k != "intermediate_size"}, **extra)
    return AutoConfig.for_model(model_type, **TOY, **extra)


def hiera_standin_config(image_size: int, num_frames: int) -> dict:
    """A toy video Hiera in the layout of the Kinetics checkpoints (16-frame views, 4 stages, 3 q-pooling steps)."""
    clip = HIERA_CLIP if num_frames % HIERA_CLIP == 0 else num_frames
    video = {"q_stride": [1, 2, 2], "mask_unit_size": [1, 8, 8], "patch_kernel": [3, 7, 7], "patch_stride": [2, 4, 4],
             "patch_padding": [1, 3, 3], "sep_pos_embed": True}  # fmt: skip
    return {"input_size": [clip, image_size, image_size], **video, "embed_dim": 16, "num_heads": 1,
            "stages": [1, 1, 2, 1], "num_classes": 4}  # fmt: skip


def build_standin_weights(run: RunConfig, out: str | Path, seed: int = 0) -> RunConfig:
    """Write toy weights of ``run``'s architecture families under ``out``; return ``run`` pointing at them."""
    import timm
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    data = run.to_dict()
    for enc in data["model"]["encoders"]:
        folder = out / enc["id"]
        if enc["kind"] == "timm_image":
            enc["model_kwargs"] = {**enc["model_kwargs"], "embed_dim": 32, "depth": 2, "num_heads": 2}
            enc["weights"] = str(folder / "model.safetensors")
            save_module(
                timm.create_model(enc["arch"], pretrained=False, num_classes=0, **enc["model_kwargs"]), enc["weights"]
            )
        elif enc["kind"] in ("hf_image", "hf_video"):
            if not enc["arch"]:
                raise ValueError(f"encoder {enc['id']!r}: set 'arch' (the transformers model_type) to build a stand-in")
            AutoModel.from_config(_hf_vision_config(enc["arch"], enc["image_size"], enc["num_frames"])).save_pretrained(
                folder
            )
            enc["weights"] = str(folder)
        elif enc["kind"] == "hiera_video":
            from merv.models.hiera import import_hiera

            import_hiera()(**hiera_standin_config(enc["image_size"], enc["num_frames"])).save_pretrained(folder)
            enc["weights"] = str(folder)
        elif enc["kind"] == "languagebind_video":
            # 8-frame clips like the real checkpoint when the frame count allows it (16 frames: two clips of 8)
            clip = LANGUAGEBIND_CLIP if enc["num_frames"] % LANGUAGEBIND_CLIP == 0 else enc["num_frames"]
            write_standin(folder, enc["image_size"], clip)
            enc["weights"] = str(folder)

    llm = data["model"]["llm"]
    if not llm["arch"]:
        raise ValueError("llm: set 'arch' (the transformers model_type, e.g. llama) to build a stand-in")
    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=512)
    if llm["arch"] == "qwen2":  # like Qwen2.5: no BOS token, a ChatML template
        tokenizer.bos_token = None
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
    config = AutoConfig.for_model(
        llm["arch"],
        vocab_size=len(tokenizer),
        **{**TOY, "hidden_size": 64, "intermediate_size": 128},
        num_key_value_heads=1,
        max_position_embeddings=llm["max_length"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    llm["weights"] = str(out / "llm")
    AutoModelForCausalLM.from_config(config).save_pretrained(llm["weights"])
    tokenizer.save_pretrained(llm["weights"])
    return run_config_from_dict(data, where="stand-in config")
