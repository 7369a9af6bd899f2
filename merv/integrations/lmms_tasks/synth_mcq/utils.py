"""Functions of the merv_synth_mcq tasks: questions from a MERV eval_data benchmark, prompts and scoring as
``merv eval`` has them (merv.data.shards reads the layout, merv.prompting writes the prompt, merv.eval.metrics has
the letter rule)."""

from __future__ import annotations

from pathlib import Path

import yaml

from merv.data.shards import benchmark_items
from merv.eval.metrics import first_char_letter
from merv.prompting import mcq_prompt, option_letters

TEMPLATE = Path(__file__).with_name("_default_template_yaml")


def benchmark_dir() -> Path:
    """The folder of the template's ``test_q.json`` (a relative path: this folder's when the file is there, else the
    working directory's, as lmms-eval and datasets resolve it)."""
    path = Path(yaml.safe_load(TEMPLATE.read_text())["dataset_kwargs"]["data_files"]["test"])
    if not path.is_absolute() and (TEMPLATE.parent / path).is_file():
        path = TEMPLATE.parent / path
    return path.resolve().parent


def process_docs(dataset):
    """Each question with its answer (``answer_id``) and its video (``video``, and a clip window when the question
    has ``time`` or ``end_frame``), joined from test_a.json and videos/ of the same folder."""
    bench = benchmark_dir()
    items = {item.record["question_id"]: item for item in benchmark_items(bench)}

    def join(doc: dict) -> dict:
        item = items.get(doc["question_id"])
        if item is None or "answer_id" not in item.record:
            raise ValueError(f"{bench}: question {doc['question_id']!r} has no answer_id in test_a.json")
        return {
            "answer_id": int(item.record["answer_id"]),
            "video": str(item.media),
            "time": list(item.time) if item.time is not None else None,
            "end_frame": item.end_frame,
        }

    return dataset.map(join)


def doc_to_visual(doc: dict) -> list:
    """The question's video: its path, or a clip of it (merv's model reads ``{"path", "time", "end_frame"}``)."""
    if doc.get("time") is None and doc.get("end_frame") is None:
        return [doc["video"]]
    return [{"path": doc["video"], "time": doc.get("time"), "end_frame": doc.get("end_frame")}]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """MERV's multiple-choice prompt: the question, the instruction, the lettered options."""
    return mcq_prompt(doc["question"], doc["options"])


def doc_to_choice(doc: dict) -> list[str]:
    return option_letters(len(doc["options"]))


def process_results(doc: dict, results: list[str]) -> dict:
    """MERV's letter rule: the first character of the stripped answer must be the option letter (either case)."""
    answer = option_letters(len(doc["options"]))[doc["answer_id"]]
    return {"accuracy_generate_firstchar": float(first_char_letter(results[0]) == answer)}
