"""The benchmarks of the paper (and the synthetic ones) in MERV's ``eval_data`` layout, as data.

Each entry says how a question is asked and scored: its kind (open-ended, scored by an LLM judge; or multiple
choice), the answer field of ``test_a.json``, the text appended to the question, the headline metric and the
generation length of the original evaluation. A benchmark the registry does not know is evaluated with a generic
entry inferred from its questions (options present -> multiple choice), and its results say so.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Literal

Kind = Literal["open", "mcq"]
# open-ended: judged by an LLM when a judge is configured, else normalised exact match (the metric name says which)
OPEN_METRIC = "judge_accuracy | exact_match"
MCQ_METRIC = "accuracy_generate_firstchar"


@dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark is asked and scored."""

    name: str
    kind: Kind
    answer_field: str  # field of test_a.json holding the reference: "answer" (text) or "answer_id" (option index)
    prompt_suffix: str = ""  # appended to the question of an open-ended benchmark (MCQ: the option instruction)
    metric: str = OPEN_METRIC
    max_new_tokens: int = 512  # the original's generation length
    source: str = ""  # where the data comes from / how it was prepared
    registered: bool = True  # False: a generic entry inferred from the data
    folder_fps: float = 1.0  # frame rate of the benchmark's frame folders (videos/<name>/): places 'time' windows

    def to_dict(self) -> dict:
        return asdict(self)


def _open(name: str, source: str) -> BenchmarkSpec:
    # MERV asks open-ended questions as they are (no suffix) and generates up to 512 tokens, greedy.
    return BenchmarkSpec(name, "open", "answer", "", OPEN_METRIC, 512, source)


def _mcq(name: str, source: str) -> BenchmarkSpec:
    # The option instruction is part of the MCQ prompt itself (merv.prompting.mcq_prompt).
    return BenchmarkSpec(name, "mcq", "answer_id", "", MCQ_METRIC, 512, source)


REGISTRY: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        _open("msvd_qa", "MSVD-QA, prepared the Video-LLaVA way"),
        _open("msrvtt_qa", "MSRVTT-QA, prepared the Video-LLaVA way"),
        _open("tgif_qa", "TGIF-QA FrameQA, prepared the Video-LLaVA way"),
        _open("activitynet_qa", "ActivityNet-QA, prepared the Video-LLaVA way"),
        _mcq("perception_test", "Perception Test MCQ (google-deepmind/perception_test), optional end_frame"),
        _mcq("nextqa", "NExT-QA MCQ, prepared the SeViLA way"),
        # VLEP ships its videos as folders of frames sampled at 3 fps (jayleicn/VideoLanguageFuturePred), as the
        # original reads them
        replace(_mcq("vlep", "VLEP (two options), prepared the SeViLA way, clip windows in 'time'"), folder_fps=3.0),
        _mcq("tvqa", "TVQA MCQ, prepared the SeViLA way, clip windows in 'time'"),
        BenchmarkSpec("synth_mcq", "mcq", "answer_id", "", MCQ_METRIC, 8, "merv synth (built-in)"),
        BenchmarkSpec("synth_open", "open", "answer", "", OPEN_METRIC, 8, "merv synth (built-in)"),
    )
}
ALIASES = {"msvd": "msvd_qa", "msrvtt": "msrvtt_qa", "tgif": "tgif_qa", "activitynet": "activitynet_qa"}


def canonical(name: str) -> str:
    """``'MSVD-QA'``, ``'msvd_qa'``, ``'MSVD'`` -> ``'msvd_qa'``; unknown names are lower-cased and kept."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    by_key = {re.sub(r"[^a-z0-9]", "", n): n for n in REGISTRY}
    by_key |= {re.sub(r"[^a-z0-9]", "", a): n for a, n in ALIASES.items()}
    return by_key.get(key, name.lower())


def lookup(name: str, first_question: dict | None = None) -> BenchmarkSpec:
    """The registered entry for ``name``, else a generic one inferred from a question record of the benchmark."""
    key = canonical(name)
    if key in REGISTRY:
        return REGISTRY[key]
    if first_question is None:
        raise ValueError(
            f"benchmark {name!r} is not registered ({sorted(REGISTRY)}) and has no questions to infer from"
        )
    kind: Kind = "mcq" if "options" in first_question else "open"
    answer_field = "answer_id" if kind == "mcq" else "answer"
    metric = MCQ_METRIC if kind == "mcq" else OPEN_METRIC
    return BenchmarkSpec(name, kind, answer_field, "", metric, 512, "not registered: kind inferred", registered=False)


def check_question(spec: BenchmarkSpec, record: dict) -> None:
    """A question record must carry what its benchmark's kind needs; the error names the question."""
    qid = record.get("question_id")
    if spec.answer_field not in record:
        raise ValueError(f"{spec.name}: question {qid!r} has no {spec.answer_field!r} (from test_a.json)")
    if spec.kind == "mcq":
        options = record.get("options")
        if not isinstance(options, list) or not 1 <= len(options) <= 26:
            raise ValueError(f"{spec.name}: question {qid!r} needs a list of 1 to 26 'options', got {options!r}")
        answer = record[spec.answer_field]
        if not isinstance(answer, int) or not 0 <= answer < len(options):
            raise ValueError(
                f"{spec.name}: question {qid!r} has answer_id {answer!r} outside its {len(options)} options"
            )
