"""From decoded shard samples to model batches: pick each encoder's frames, transform, tokenize, collate."""

from __future__ import annotations

import torch

from merv.data.loader import pad_sequences
from merv.models.prompting import IGNORE_INDEX, conversation_to_ids


def encoder_frames(model, sample: dict) -> dict[str, torch.Tensor]:
    """Each encoder's own frames from the shared stack, transformed: ``{encoder: [T_e, 3, S_e, S_e]}``."""
    positions = sample["meta"]["frame_positions"]
    picked = {}
    for name, enc in model.encoders.items():
        key = str(enc.num_frames)
        if key not in positions:
            raise ValueError(
                f"sample {sample['meta'].get('key')!r} was sharded for frame counts {sorted(positions)}, "
                f"but encoder {name!r} needs {enc.num_frames}: reshard with that count"
            )
        picked[name] = sample["frames"][positions[key]]
    return model.transform(picked)


def training_example(model, sample: dict) -> dict:
    ids, labels = conversation_to_ids(model.tokenizer, sample["meta"]["conversations"], model.cfg.llm.prompt_format)
    limit = model.cfg.llm.max_length - model.cfg.visual_tokens
    return {"videos": encoder_frames(model, sample), "input_ids": ids[:limit], "labels": labels[:limit]}


def collate(examples: list[dict]) -> dict:
    """Stack each encoder's frames and right-pad the text: ``input_ids``/``labels`` ``[B, L]``, ``lengths [B]``."""
    names = examples[0]["videos"].keys()
    input_ids, lengths = pad_sequences([ex["input_ids"] for ex in examples], value=0)
    labels, _ = pad_sequences([ex["labels"] for ex in examples], value=IGNORE_INDEX)
    return {
        "videos": {n: torch.stack([ex["videos"][n] for ex in examples]) for n in names},  # [B, T, 3, S, S]
        "input_ids": input_ids,
        "labels": labels,
        "lengths": lengths,
    }
