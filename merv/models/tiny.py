"""Build the weights of ``merv-tiny`` from configs, locally: no hub downloads.

Each part is saved the way real weights are shipped and later loaded back through the same code path:
a timm state-dict file, a transformers ``save_pretrained`` folder for the video encoder, and a Llama-style
``save_pretrained`` folder with a tokenizer trained here on the synthetic corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merv.config import EncoderConfig, RunConfig

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


# Architecture of the tiny ViViT when the preset gives none: ``model_kwargs`` of an hf_video encoder overrides these
# (VivitConfig fields); the built folder's config.json then records the architecture.
TINY_VIVIT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def init_encoder(enc: EncoderConfig) -> torch.nn.Module:
    """A randomly initialised encoder module of the architecture ``enc`` describes (a timm model or a ViViT)."""
    if enc.kind == "timm_image":
        import timm

        from merv.models.encoders import timm_kwargs

        return timm.create_model(enc.arch, pretrained=False, num_classes=0, **timm_kwargs(enc))
    if enc.kind == "hf_video":
        from transformers import VivitConfig, VivitModel

        patch = max(8, enc.image_size // 4)
        kwargs = {"tubelet_size": [2, patch, patch], **TINY_VIVIT, **enc.model_kwargs}
        return VivitModel(VivitConfig(image_size=enc.image_size, num_frames=enc.num_frames, **kwargs))
    raise ValueError(f"merv-tiny cannot build encoder kind {enc.kind!r}")


def save_encoder(enc: EncoderConfig, module: torch.nn.Module, path: str | Path | None = None) -> Path:
    """Save an encoder module the way its real weights ship (timm: a safetensors file; ViViT: a ``save_pretrained``
    folder with ``preprocessor_config.json``) at ``path`` (default: the path the config names)."""
    path = Path(path or enc.weights)
    if enc.kind == "timm_image":
        save_module(module, path)
    elif enc.kind == "hf_video":
        module.save_pretrained(path)
        stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
        (path / "preprocessor_config.json").write_text(json.dumps(stats))
    else:
        raise ValueError(f"merv-tiny cannot save encoder kind {enc.kind!r}")
    return path


def build_tiny_weights(
    run: RunConfig, texts: list[str], seed: int = 0, skip_encoders: tuple[str, ...] = ()
) -> list[Path]:
    """Write randomly initialised weights for every part of ``run.model`` to the paths it names; returns them.

    Encoders named in ``skip_encoders`` are left out (their weights come from elsewhere: ``merv pretrain``). Each
    part is seeded on its own, so the LLM is the same whichever encoders a model has (the ablation grid)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    unknown = sorted(set(skip_encoders) - {e.id for e in run.model.encoders})
    if unknown:
        raise ValueError(f"build-tiny: cannot skip encoder(s) {unknown}: model {run.model.name!r} has no such encoder")
    written = []
    for enc in run.model.encoders:
        if enc.id not in skip_encoders:
            torch.manual_seed(seed + sum(map(ord, enc.id)))  # by id, not position: the same encoder in every model
            written.append(save_encoder(enc, init_encoder(enc)))

    torch.manual_seed(seed)
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
    return written + [Path(run.model.llm.weights)]
