"""Teaching a tiny model a few answers in-process (serve and lmms-eval tests check what it then says)."""

from __future__ import annotations

import torch


def fit(model, examples: list[dict], steps: int) -> float:
    """Full-batch Adam on projectors, fusion and LLM; returns the last loss per token."""
    from merv.data.batching import collate

    batch = collate(examples)
    params = [p for name, p in model.named_parameters() if not name.startswith("encoders.")]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    model.train()
    for _ in range(steps):
        loss, n, _ = model(batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"])
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach() / n)
