"""Fixtures of the lmms-eval tests: a synthetic MCQ benchmark in a project-like folder, a tiny checkpoint taught
(briefly) to answer it, the untrained tiny model saved as a checkpoint, and merv's entry point made visible to
lmms-eval the way an installed package makes it visible."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.overfit import fit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

EVAL_VIDEOS = 24
TAUGHT = 12  # the checkpoint is taught the answers of the first TAUGHT questions; the others it has never seen
FIT_STEPS = 120


def mcq_examples(model, bench: Path) -> list[dict]:
    """Training examples (frames per encoder, tokens, labels) of a MERV eval_data MCQ benchmark: the question's MCQ
    prompt answered by its option letter."""
    from merv.data.shards import benchmark_items
    from merv.data.transforms import frame_size
    from merv.data.video import read_frames
    from merv.prompting import conversation_to_ids, mcq_prompt, option_letters

    counts = [e.num_frames for e in model.encoders.values()]
    examples = []
    for item in benchmark_items(bench):
        rec = item.record
        frames, positions = read_frames(item.media, counts, frame_size(model.cfg.encoders))
        turns = [
            {"from": "human", "value": "<video>\n" + mcq_prompt(rec["question"], rec["options"])},
            {"from": "gpt", "value": option_letters(len(rec["options"]))[rec["answer_id"]]},
        ]
        ids, labels = conversation_to_ids(model.tokenizer, turns, model.cfg.llm.prompt_format)
        per_encoder = {n: frames[positions[e.num_frames]] for n, e in model.encoders.items()}
        examples.append({"videos": model.transform(per_encoder), "input_ids": ids, "labels": labels})
    return examples


def save(model, run, out: Path, meta: dict) -> Path:
    from merv.checkpoint import save_checkpoint
    from merv.config import fingerprint

    meta = {"stage": "finetune", "trained_groups": ["fusion", "llm", "projectors"], "seed": 0, "init": None,
            "config_fingerprint": fingerprint([run.to_dict(), meta]), **meta}  # fmt: skip
    save_checkpoint(model, run, out, meta)
    return out


def pyproject() -> dict:
    """The ``[project]`` table of the repository's pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A folder laid out as the project: ``data/synth/eval_data/synth_mcq`` where ``make demo`` puts it (the
    lmms-eval task's default path, relative to the working directory)."""
    from merv.data.synth import write_dataset

    root = tmp_path_factory.mktemp("project")
    write_dataset(root / "data" / "synth", seed=7, train_videos=0, eval_videos=EVAL_VIDEOS)
    return root


@pytest.fixture(scope="session")
def bench(project) -> Path:
    return project / "data" / "synth" / "eval_data" / "synth_mcq"


@pytest.fixture(scope="session")
def mcq_checkpoint(tiny_run, bench, tmp_path_factory) -> Path:
    """merv-tiny taught the answers of the first TAUGHT questions (some seconds of CPU): it answers every question
    with an option letter, right on those and at about chance on the rest."""
    from merv.models.merv import MERV

    torch.manual_seed(0)
    model = MERV.from_config(tiny_run.model)
    loss = fit(model, mcq_examples(model, bench)[:TAUGHT], FIT_STEPS)
    assert loss < 0.3, f"the tiny model did not learn its answers (loss {loss:.3f})"
    out = tmp_path_factory.mktemp("mcq-ckpt") / "finetune"
    return save(model, tiny_run, out, {"step": FIT_STEPS, "final_loss": loss, "taught": TAUGHT})


@pytest.fixture(scope="session")
def untrained_checkpoint(tiny_model, tiny_run, tmp_path_factory) -> Path:
    """The untrained tiny model: its answers are long and arbitrary (stop strings have something to cut)."""
    return save(tiny_model, tiny_run, tmp_path_factory.mktemp("raw-ckpt") / "finetune", {"step": 0})


@pytest.fixture(scope="session")
def entry_point_path(tmp_path_factory) -> Path:
    """A folder holding merv's installed-package metadata with the ``lmms_eval.models`` entry points that
    pyproject.toml declares (what ``pip install`` writes into site-packages). Put first on PYTHONPATH, lmms-eval's
    registry finds ``--model merv`` through it, even where merv was installed before the entry point existed."""
    from merv.version import __version__  # pyproject.toml's version is dynamic: it reads this

    project = pyproject()
    group = project["entry-points"]["lmms_eval.models"]
    info = tmp_path_factory.mktemp("site") / f"merv-{__version__}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: merv\nVersion: {__version__}\n")
    lines = ["[lmms_eval.models]", *(f"{name} = {target}" for name, target in group.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info.parent
