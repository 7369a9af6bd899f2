import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from merv.data.synth import QUESTIONS, balanced_types, render, sample_clip, write_dataset, write_mp4
from merv.data.video import read_frames
from merv.prompting import mcq_prompt, option_letters


def test_dataset_layout(synth_dir):
    train = json.loads((synth_dir / "train" / "finetune.json").read_text())
    assert len(train) == 12
    first = train[0]["conversations"][0]
    assert first["from"] == "human" and first["value"].startswith("<video>\n")
    assert all((synth_dir / "train" / s["video"]).is_file() for s in train)
    for bench in ("synth_mcq", "synth_open"):
        d = synth_dir / "eval_data" / bench
        qs = json.loads((d / "test_q.json").read_text())
        ans = {a["question_id"]: a for a in json.loads((d / "test_a.json").read_text())}
        assert len(qs) == 6 and set(ans) == {q["question_id"] for q in qs}
        assert all((d / "videos" / f"{q['video_name']}.mp4").is_file() for q in qs)
    mcq = json.loads((synth_dir / "eval_data" / "synth_mcq" / "test_q.json").read_text())[0]
    assert mcq["num_option"] == len(mcq["options"])


def test_every_question_type_is_asked_equally_often(synth_dir):
    for bench in ("synth_mcq", "synth_open"):  # 6 questions: two types twice, two once
        qs = json.loads((synth_dir / "eval_data" / bench / "test_q.json").read_text())
        assert sorted(Counter(q["question_type"] for q in qs).values()) == [1, 1, 2, 2]
    types = balanced_types(random.Random(0), 600)
    assert Counter(types) == dict.fromkeys(QUESTIONS, 150)
    assert types[:8] != list(QUESTIONS) * 2, "in a random order, not cycling"


def test_questions_need_appearance_and_motion():
    attributes = {attr for _, _, attr in QUESTIONS.values()}
    assert {"colour", "shape"} <= attributes and {"first", "last"} <= attributes


def test_deterministic_from_seed(tmp_path):
    a = write_dataset(tmp_path / "a", seed=3, train_videos=3, eval_videos=2)
    b = write_dataset(tmp_path / "b", seed=3, train_videos=3, eval_videos=2)
    assert a == b
    for rel in ("train/finetune.json", "eval_data/synth_mcq/test_q.json", "eval_data/synth_open/test_a.json"):
        assert (tmp_path / "a" / rel).read_text() == (tmp_path / "b" / rel).read_text()
    fa, _ = read_frames(tmp_path / "a" / "train/videos/train_00000.mp4", [8], 64)
    fb, _ = read_frames(tmp_path / "b" / "train/videos/train_00000.mp4", [8], 64)
    assert np.array_equal(fa, fb)


def test_motion_is_visible_in_decoded_frames(tmp_path):
    import random

    clip = sample_clip(random.Random(0), "c", 64, travel=12)
    frames = render(clip, 64, 16, travel=12)

    def centre(frame):
        ys, xs = np.nonzero(np.abs(frame.astype(int) - frame[0, 0].astype(int)).sum(-1) > 60)
        return xs.mean(), ys.mean()

    (x0, y0), (xm, ym) = centre(frames[0]), centre(frames[8])
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[clip.first]
    assert (xm - x0) * dx + (ym - y0) * dy > 5  # moved at least 5 px in the first direction


def original_mcq_prompt(question: str, options: list[str]) -> str:
    """The prompt as the original's scripts/eval_mcq.py builds it ('naive' strategy): option lines joined by
    newlines, substituted into a triple-quoted literal whose continuation line is indented by four spaces."""
    mapping = ["A. ", "B. ", "C. ", "D. ", "E. "]
    choices = "\n".join([mapping[i] + c for i, c in enumerate(options)])
    letters = ", ".join([mapping[c][0] for c in range(len(options))])
    literal = "{question} Select the correct answer from the following options. Write your answer as only one of "
    literal += "{letters} and nothing else.\n\n    {choices}"
    return literal.format(question=question, letters=letters, choices=choices)


@pytest.mark.parametrize("options", [["yes", "no"], ["red", "blue", "green", "white", "black"]])
def test_mcq_prompt_is_the_originals(options):
    assert mcq_prompt("What now?", options) == original_mcq_prompt("What now?", options)


def test_mcq_prompt_matches_original_wording():
    prompt = mcq_prompt("What colour?", ["red", "blue", "green"])
    assert prompt == (
        "What colour? Select the correct answer from the following options. Write your answer as only one of "
        "A, B, C and nothing else.\n\n    A. red\nB. blue\nC. green"
    )
    assert option_letters(3) == ["A", "B", "C"]


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_every_file_is_the_same_bytes_when_rendered_again_under_load(tmp_path):
    """The dataset is a pure function of its settings: a second render in another process, beside two busy
    processes, writes the same bytes in every file (videos included)."""
    settings = {"seed": 5, "train_videos": 40, "eval_videos": 8}
    write_dataset(tmp_path / "a", **settings)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        code = f"from merv.data.synth import write_dataset; write_dataset({str(tmp_path / 'b')!r}, **{settings!r})"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    a, b = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert len(a) == 40 + 2 * 8 + 2 + 2 * 2 + 1  # videos, training JSONs, benchmark JSONs, summary
    assert a == b, sorted(k for k in a if a[k] != b.get(k))


def test_encoding_does_not_depend_on_what_memory_held_before(tmp_path):
    """libx264's output must not depend on the heap's earlier contents (its mb-tree code read memory it never
    wrote: the same frames came out as different bytes). Each clip is encoded again after dirtying the heap."""
    rng = random.Random(0)
    clips = [sample_clip(rng, f"c{i}", 64, travel=12) for i in range(40)]
    junk = np.random.default_rng(0)
    varying = []
    for clip in clips:
        frames = render(clip, 64, 16, travel=12)
        digests = set()
        for _ in range(3):
            blocks = [os.urandom(int(n)) for n in junk.integers(1_000, 200_000, size=50)]  # freed, dirty memory
            del blocks
            write_mp4(tmp_path / "clip.mp4", frames, 8)
            digests.add(hashlib.sha256((tmp_path / "clip.mp4").read_bytes()).hexdigest())
        if len(digests) > 1:
            varying.append(clip.name)
    assert not varying, f"clips encoded to different bytes: {varying}"
