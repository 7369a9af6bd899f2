"""Build the weights of ``merv-tiny`` from configs, locally: no hub downloads.

Each part is saved the way real weights are shipped and later loaded back through the same code path:
a timm state-dict file, a transformers ``save_pretrained`` folder for the video encoder, and a Llama-style
``save_pretrained`` folder with a tokenizer trained here on the synthetic corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merv.config import RunConfig

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer, trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def save_module(module: torch.nn.Module, path: str | Path) -> None:
    """A module's state dict as a safetensors file (how timm weights are shipped and loaded back)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def build_tiny_weights(run: RunConfig, texts: list[str], seed: int = 0) -> list[Path]:
    """Write randomly initialised weights for every part of ``run.model`` to the paths it names; returns them."""
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM, VivitConfig, VivitModel

    torch.manual_seed(seed)
    for enc in run.model.encoders:
        if enc.kind == "timm_image":
            save_module(timm.create_model(enc.arch, pretrained=False, num_classes=0, **enc.model_kwargs), enc.weights)
        elif enc.kind == "hf_video":
            tubelet = 2
            patch = max(8, enc.image_size // 4)
            cfg = VivitConfig(
                image_size=enc.image_size,
                num_frames=enc.num_frames,
                tubelet_size=[tubelet, patch, patch],
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
            )
            VivitModel(cfg).save_pretrained(enc.weights)
            stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
            (Path(enc.weights) / "preprocessor_config.json").write_text(json.dumps(stats))
        else:
            raise ValueError(f"merv-tiny cannot build encoder kind {enc.kind!r}")

    tokenizer = train_tokenizer(texts)
    llm_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=run.model.llm.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(llm_cfg).save_pretrained(run.model.llm.weights)
    tokenizer.save_pretrained(run.model.llm.weights)
    return [Path(e.weights) for e in run.model.encoders] + [Path(run.model.llm.weights)]
