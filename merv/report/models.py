"""What the report measures on trained checkpoints: the cost of a question, and the fusion weights per question type
(each model's first run's checkpoint: the cost does not depend on the seed, the figure shows one trained model)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from merv.report.config import ReportConfig
from merv.report.results import OVERALL

COST_PROMPT = "Describe the video."  # the same text for every model: FLOPs then differ only by the visual path


@torch.no_grad()
def question_flops(model) -> int:
    """Forward FLOPs of one question: encoders, projectors, fusion and the LLM's prefill (one generated token),
    counted by PyTorch's FLOP counter on inputs of the model's own frame counts and sizes."""
    from torch.utils.flop_counter import FlopCounterMode

    videos = {
        name: torch.zeros(1, enc.num_frames, 3, enc.image_size, enc.image_size) for name, enc in model.encoders.items()
    }
    builder = model.get_prompt_builder()
    builder.add_turn("human", COST_PROMPT)
    counter = FlopCounterMode(display=False)
    with counter:
        model.generate_batch(videos, [builder.get_prompt()], max_new_tokens=1)
    return counter.get_total_flops()


def model_costs(cfg: ReportConfig) -> dict[str, dict]:
    """Per fusion-ablation model: fusion kind, encoder ids, visual tokens the LLM sees, GFLOPs per question."""
    from merv.checkpoint import load_checkpoint

    costs = {}
    for name in cfg.fusion_ablation:
        model, run, _ = load_checkpoint(cfg.model(name).checkpoint)
        model.eval()
        costs[name] = {
            "fusion": run.model.fusion.kind,
            "encoders": [e.id for e in run.model.encoders],
            "visual_tokens": run.model.visual_tokens,
            "gflops": question_flops(model) / 1e9,
        }
    return costs


@torch.no_grad()
def fusion_weights_by_type(cfg: ReportConfig, batch_size: int = 32) -> list[tuple]:
    """``(question_type, encoder, mean, std, n)`` of the per-sample fusion weights ``model.encode`` returns over a
    benchmark's videos, grouped by each sample's question type (``all`` first)."""
    from merv.checkpoint import load_checkpoint
    from merv.data.batching import encoder_frames
    from merv.data.shards import iter_samples

    name, bench = cfg.fusion_weights_model, cfg.benchmark(cfg.fusion_weights_benchmark)
    model, run, _ = load_checkpoint(cfg.model(name).checkpoint)
    model.eval()
    weights: dict[str, list[np.ndarray]] = defaultdict(list)
    pending: list[tuple[str, dict]] = []

    def flush():
        videos = {enc: torch.stack([v[enc] for _, v in pending]) for enc in model.encoders}
        _, w = model.encode(videos)
        if w is None:
            raise ValueError(f"report: model {name!r} (fusion {run.model.fusion.kind!r}) has no per-sample weights")
        for (qtype, _), row in zip(pending, w.float().numpy(), strict=True):
            weights[qtype].append(row)
            weights[OVERALL].append(row)
        pending.clear()

    for sample in iter_samples(Path(bench.shards)):
        pending.append((sample["meta"].get("question_type") or "untyped", encoder_frames(model, sample)))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not weights:
        raise ValueError(f"report: benchmark {bench.name!r} has no samples in {bench.shards}")
    rows = []
    for qtype in [OVERALL, *sorted(k for k in weights if k != OVERALL)]:
        w = np.stack(weights[qtype])
        for i, enc in enumerate(model.encoders):
            rows.append((qtype, enc, round(float(w[:, i].mean()), 4), round(float(w[:, i].std()), 4), len(w)))
    return rows
