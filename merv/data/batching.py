"""From decoded shard samples to model batches: each encoder's frames (from its config), tokens and labels.

Nothing here needs a model instance: :class:`ExampleBuilder` holds the resolved model config and the tokenizer, and
pickles into DataLoader workers.
"""

from __future__ import annotations

import torch

from merv.config import ModelConfig
from merv.data.loader import pad_sequences
from merv.data.transforms import video_inputs
from merv.prompting import IGNORE_INDEX, conversation_to_ids


def encoder_frames(model, sample: dict) -> dict[str, torch.Tensor] | None:
    """Each encoder's transformed frames ``{encoder: [T_e, 3, S_e, S_e]}`` of a decoded sample, for a model (or
    anything with a resolved ``cfg``); None for a text-only sample."""
    return video_inputs(model.cfg.encoders, sample)


class ExampleBuilder:
    """Decoded sample -> ``{"videos": {enc: [T, 3, S, S]} | None, "input_ids", "labels"}``.

    Text is cut to the LLM context: to ``max_length - visual tokens`` for samples with a video, to ``max_length`` for
    text-only ones (they get no visual tokens).
    """

    def __init__(self, cfg: ModelConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def __call__(self, sample: dict) -> dict:
        meta = sample["meta"]
        ids, labels = conversation_to_ids(self.tokenizer, meta["conversations"], self.cfg.llm.prompt_format)
        videos = video_inputs(self.cfg.encoders, sample)
        limit = self.cfg.llm.max_length - (self.cfg.visual_tokens if videos is not None else 0)
        return {"videos": videos, "input_ids": ids[:limit], "labels": labels[:limit], "key": meta.get("key")}


def training_example(model, sample: dict) -> dict:
    """One training example for ``model`` (see :class:`ExampleBuilder`)."""
    return ExampleBuilder(model.cfg, model.tokenizer)(sample)


def collate(examples: list[dict]) -> dict:
    """Stack the video rows' frames per encoder and right-pad the text.

    Returns ``videos`` (``{enc: [Bv, T, 3, S, S]}`` for the ``Bv`` rows with a video, or None), ``has_video [B]``,
    ``input_ids``/``labels`` ``[B, L]`` and ``lengths [B]``.
    """
    rows = [ex for ex in examples if ex["videos"] is not None]
    videos = {n: torch.stack([ex["videos"][n] for ex in rows]) for n in rows[0]["videos"]} if rows else None
    input_ids, lengths = pad_sequences([ex["input_ids"] for ex in examples], value=0)
    labels, _ = pad_sequences([ex["labels"] for ex in examples], value=IGNORE_INDEX)
    return {
        "videos": videos,
        "has_video": torch.tensor([ex["videos"] is not None for ex in examples]),
        "input_ids": input_ids,
        "labels": labels,
        "lengths": lengths,
    }
