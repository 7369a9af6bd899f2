"""From decoded shard samples to model batches: pick each encoder's frames, transform, tokenize, collate."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from merv.models.prompting import conversation_to_ids


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
    limit = model.cfg.llm.max_length - model.cfg.projector.visual_tokens
    return {"videos": encoder_frames(model, sample), "input_ids": ids[:limit], "labels": labels[:limit]}


def collate(examples: list[dict]) -> dict:
    names = examples[0]["videos"].keys()
    return {
        "videos": {n: torch.stack([ex["videos"][n] for ex in examples]) for n in names},  # [B, T, 3, S, S]
        "input_ids": [ex["input_ids"] for ex in examples],
        "labels": [ex["labels"] for ex in examples],
    }


def batches(examples: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Group examples into collated batches; the last partial batch is kept."""
    buf = []
    for ex in examples:
        buf.append(ex)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)
