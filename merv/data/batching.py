"""From decoded shard samples to model batches: each encoder's frames (from its config), tokens and labels.

Nothing here needs a model instance: :class:`ExampleBuilder` holds the resolved model config and the tokenizer, and
pickles into DataLoader workers.
"""

from __future__ import annotations

import torch

from merv.config import ModelConfig
from merv.data.loader import pad_sequences
from merv.data.transforms import video_inputs
from merv.prompting import IGNORE_INDEX, caption_to_ids, conversation_to_ids


def encoder_frames(model, sample: dict) -> dict[str, torch.Tensor] | None:
    """Each encoder's transformed frames ``{encoder: [T_e, 3, S_e, S_e]}`` of a decoded sample, for a model (or
    anything with a resolved ``cfg``); None for a text-only sample."""
    return video_inputs(model.cfg.encoders, sample)


class ExampleBuilder:
    """Decoded sample -> ``{"videos": {enc: [T, 3, S, S]}, "features": {enc: tensor}, "input_ids", "labels"}``.

    Encoders named in ``cached`` take their features from the sample (a feature cache), the others their frames;
    ``videos`` and ``features`` are None for a text-only sample. ``text`` is the stage's text format (see
    :class:`merv.config.StageConfig`). Text is cut as ``llm.truncation`` says: to ``max_length`` tokens on its own
    ("text", the original: the visual tokens come on top), or to ``max_length - visual tokens`` for samples with a
    video ("sequence").
    """

    def __init__(self, cfg: ModelConfig, tokenizer, cached: frozenset[str] = frozenset(), text: str = "conversation"):
        self.cfg, self.tokenizer, self.cached, self.text = cfg, tokenizer, frozenset(cached), text
        self.live = tuple(e for e in cfg.encoders if e.id not in self.cached)

    def __call__(self, sample: dict) -> dict:
        meta = sample["meta"]
        if self.text == "caption":
            ids, labels = caption_to_ids(self.tokenizer, meta["conversations"], where=f"sample {meta.get('key')!r}")
        else:
            ids, labels = conversation_to_ids(self.tokenizer, meta["conversations"], self.cfg.llm.prompt_format)
        features = sample.get("features") or {}
        visual = sample["frames"] is not None or bool(features)
        videos = features_in = None
        if visual:
            missing = sorted(self.cached - set(features))
            if missing:
                raise ValueError(f"sample {meta.get('key')!r}: no cached features of encoder(s) {missing}")
            videos = video_inputs(self.live, sample) if self.live else {}
            features_in = {e: features[e] for e in sorted(self.cached)}
        limit = self.cfg.llm.max_length
        if self.cfg.llm.truncation == "sequence" and visual:
            limit -= self.cfg.visual_tokens
        return {
            "videos": videos,
            "features": features_in,
            "input_ids": ids[:limit],
            "labels": labels[:limit],
            "key": meta.get("key"),
        }


def training_example(model, sample: dict) -> dict:
    """One training example for ``model`` (see :class:`ExampleBuilder`)."""
    return ExampleBuilder(model.cfg, model.tokenizer)(sample)


def _stack(rows: list[dict], field: str) -> dict[str, torch.Tensor] | None:
    if not rows or rows[0].get(field) is None:
        return None
    return {n: torch.stack([ex[field][n] for ex in rows]) for n in rows[0][field]}


def collate(examples: list[dict]) -> dict:
    """Stack the video rows' frames (and cached features) per encoder and right-pad the text.

    Returns ``videos`` (``{enc: [Bv, T, 3, S, S]}`` for the ``Bv`` rows with a video, or None), ``features``
    (``{enc: [Bv, ...]}`` or None), ``has_video [B]``, ``input_ids``/``labels`` ``[B, L]``, ``lengths [B]`` and the
    samples' ``keys`` (named when a step goes wrong).
    """
    rows = [ex for ex in examples if ex["videos"] is not None]
    input_ids, lengths = pad_sequences([ex["input_ids"] for ex in examples], value=0)
    labels, _ = pad_sequences([ex["labels"] for ex in examples], value=IGNORE_INDEX)
    return {
        "videos": _stack(rows, "videos"),
        "features": _stack(rows, "features"),
        "has_video": torch.tensor([ex["videos"] is not None for ex in examples]),
        "input_ids": input_ids,
        "labels": labels,
        "lengths": lengths,
        "keys": [ex.get("key") for ex in examples],
    }
