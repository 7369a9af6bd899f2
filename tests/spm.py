"""A real SentencePiece tokenizer for tests, offline after one download from PyPI: the ``mistral-common`` wheel ships
``mistral_common/data/tokenizer.model.v1`` (Mistral-7B v0.1: 32000 pieces, the Llama-2 BPE algorithm with byte
fallback). It is turned into transformers tokenizers in the two ``tokenizer.json`` forms real checkpoints ship:

- ``legacy`` (Llama-2-7b-hf and its fine-tunes): a normalizer that prepends ``▁`` and replaces spaces by ``▁``, no
  pre-tokenizer, so a lone ``" A"`` is two tokens;
- ``metaspace`` (newer conversions): a Metaspace pre-tokenizer that prepends ``▁`` to the first word only.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "mistral-common==1.13.1"
MEMBER = "mistral_common/data/tokenizer.model.v1"
FORMS = ("legacy", "metaspace")


def sentencepiece_model(cache: Path) -> Path:
    """The SentencePiece model file, downloaded (once, into ``cache``) from the ``mistral-common`` wheel on PyPI."""
    target = cache / "tokenizer.model.v1"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", WHEEL]
    cmd += ["-d", str(cache)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (wheel,) = cache.glob("mistral_common-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(zf.read(MEMBER))
        tmp.replace(target)
    wheel.unlink()
    return target


def build_tokenizer(model_file: Path, form: str, out: Path):
    """A transformers tokenizer of the SentencePiece model in ``form`` (see the module docstring), saved to ``out``
    and loaded back with ``AutoTokenizer`` as a real checkpoint's would be."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(str(model_file)).extract(BPE)
    tok = Tokenizer(BPE(extracted["vocab"], extracted["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if form == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    elif form == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        raise ValueError(f"unknown tokenizer form {form!r}; use one of {FORMS}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def build_llm(tokenizer, out: Path, max_length: int = 256) -> Path:
    """A tiny Llama with the tokenizer's 32000-piece vocabulary, saved with it to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
