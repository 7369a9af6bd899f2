"""Benchmark evaluation on sharded ``eval_data`` benchmarks: batched greedy generation, then scoring.

Multiple-choice: the prediction's option letter must equal the answer's (original MERV protocol); ``chance`` is the
mean over questions of 1/num_options. Open-ended: normalised exact match against the reference answer, a local
metric for the synthetic benchmark (the LLM-judge protocol of Video-ChatGPT comes with the evaluation stage).
"""

from __future__ import annotations

import re
import string

import torch

from merv.data.batching import encoder_frames
from merv.data.shards import iter_samples
from merv.models.merv import MERV
from merv.prompting import mcq_prompt, option_letters


def question_prompt(model: MERV, record: dict) -> str:
    builder = model.get_prompt_builder()
    if record["kind"] == "mcq":
        builder.add_turn("human", mcq_prompt(record["question"], record["options"]))
    else:
        builder.add_turn("human", record["question"])
    return builder.get_prompt()


def parse_letter(prediction: str, num_options: int) -> str | None:
    """The first standalone option letter in the prediction (``"B"``, ``"B."``, ``"(B) dog"``), else None."""
    valid = "".join(option_letters(num_options))
    match = re.search(rf"(?<![A-Za-z])([{valid}])(?![a-z])", prediction.strip())
    return match.group(1) if match else None


def normalise(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def score(record: dict, prediction: str) -> bool:
    if record["kind"] == "mcq":
        return parse_letter(prediction, len(record["options"])) == option_letters(26)[record["answer_id"]]
    return normalise(prediction) == normalise(str(record["answer"]))


@torch.no_grad()
def evaluate(model: MERV, shard_dir, batch_size: int = 16, max_new_tokens: int = 8) -> dict:
    """Answer every question of a sharded benchmark; returns the metric and per-question predictions."""
    model.eval()
    rows, chance = [], []
    pending: list[tuple[dict, dict]] = []

    def flush():
        videos = {n: torch.stack([v[n] for _, v in pending]) for n in model.encoders}
        prompts = [question_prompt(model, rec) for rec, _ in pending]
        for (rec, _), pred in zip(pending, model.generate_batch(videos, prompts, max_new_tokens), strict=True):
            rows.append(
                {
                    "question_id": rec["question_id"],
                    "prediction": pred,
                    "answer": rec["answer"],
                    "correct": score(rec, pred),
                }
            )
        pending.clear()

    kind = None
    for sample in iter_samples(shard_dir):
        record = sample["meta"]
        kind = kind or record["kind"]
        if record["kind"] == "mcq":
            chance.append(1.0 / len(record["options"]))
        pending.append((record, encoder_frames(model, sample)))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not rows:
        raise ValueError(f"{shard_dir}: benchmark has no questions")
    result = {
        "metric": "accuracy" if kind == "mcq" else "exact_match",
        "value": sum(r["correct"] for r in rows) / len(rows),
        "n": len(rows),
    }
    if chance:
        result["chance"] = sum(chance) / len(chance)
    return {**result, "predictions": rows}
