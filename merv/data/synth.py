"""The built-in synthetic dataset: short H.264 clips of one coloured shape that moves, then turns.

Each clip has an appearance (colour, shape) and a motion (first direction, then a second one). Questions ask for
each of the four, so a model needs appearance *and* motion, i.e. both a per-frame and a video encoder help.
Every file is a pure function of the settings and the seed (same bytes on every run). Written in the formats real
data uses:

- training JSON in the Video-LLaVA conversation layout (``align.json`` captions, ``finetune.json`` QA),
- evaluation benchmarks in the MERV ``eval_data`` layout (``test_q.json``, ``test_a.json``, ``videos/``).

Each evaluation clip has one question; every benchmark asks each question type equally often (a score per type is
then as precise as the next). Options of a multiple-choice question are listed in a fixed order per question type:
the tiny CPU model then only has to learn perception, not to match option text, and chance is still
1/len(options).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merv.prompting import mcq_prompt, option_letters
from merv.settings import SynthSection

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# question type -> (question text, ordered options, attribute of the clip that answers it)
QUESTIONS = {
    "colour": ("What colour is the moving shape?", tuple(COLOURS), "colour"),
    "shape": ("Which shape is in the video?", SHAPES, "shape"),
    "first_direction": ("Which way does the shape move first?", tuple(DIRECTIONS), "first"),
    "last_direction": ("Which way does the shape move at the end?", tuple(DIRECTIONS), "last"),
}


@dataclass(frozen=True)
class Clip:
    name: str
    colour: str
    shape: str
    first: str
    last: str
    start: tuple[int, int]

    @property
    def caption(self) -> str:
        return f"A {self.colour} {self.shape} moves {self.first}, then {self.last}."


def sample_clip(rng: random.Random, name: str, size: int, travel: int) -> Clip:
    colour = rng.choice(tuple(COLOURS))
    shape = rng.choice(SHAPES)
    first = rng.choice(tuple(DIRECTIONS))
    # The second leg turns by 90 degrees, so first and last are never the same and the path stays on screen.
    dx, dy = DIRECTIONS[first]
    last = rng.choice([d for d, (ex, ey) in DIRECTIONS.items() if ex * dx + ey * dy == 0])
    ex, ey = DIRECTIONS[last]
    margin = size // 5 + 1  # shape radius + 1
    # start so that start + travel*(first) + travel*(last) stays inside [margin, size - margin]
    end_x, end_y = travel * (dx + ex), travel * (dy + ey)
    lo_x, hi_x = margin - min(0, dx * travel, end_x), size - margin - max(0, dx * travel, end_x)
    lo_y, hi_y = margin - min(0, dy * travel, end_y), size - margin - max(0, dy * travel, end_y)
    start = (rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y))
    return Clip(name, colour, shape, first, last, start)


def render(clip: Clip, size: int, num_frames: int, travel: int) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` uint8: the shape on a mid-grey checkered background."""
    yy, xx = np.mgrid[0:size, 0:size]
    background = (118 + 20 * ((xx // 8 + yy // 8) % 2)).astype(np.uint8)  # mid-grey: near zero once normalised
    radius = size // 5
    colour = np.array(COLOURS[clip.colour], dtype=np.uint8)
    dx1, dy1 = DIRECTIONS[clip.first]
    dx2, dy2 = DIRECTIONS[clip.last]
    half = (num_frames - 1) / 2
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        a = min(t, half) / half * travel
        b = max(0.0, t - half) / half * travel
        cx = clip.start[0] + dx1 * a + dx2 * b
        cy = clip.start[1] + dy1 * a + dy2 * b
        if clip.shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        elif clip.shape == "square":
            mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
        else:  # triangle pointing up
            mask = (yy - cy <= radius) & (yy - cy >= -radius) & (np.abs(xx - cx) <= (yy - cy + radius) / 2)
        frame = np.repeat(background[..., None], 3, axis=2)
        frame[mask] = colour
        frames[t] = frame
    return frames


# libx264 settings that make the bytes a function of the frames alone (measured with PyAV 18.1 / libavcodec 62):
# - mbtree=0: x264's macroblock-tree rate control (on in every preset but ultrafast) reads memory it never wrote in
#   its SIMD code: with the heap dirtied before each encode, 16 of 150 clips came out in 2-4 different byte streams
#   (decoding to the same pixels), 0 of 150 with mbtree off. That is how two clones of the same commit rendered 6
#   of 1200 training clips differently;
# - threads=1: x264's default threads follow the core count (1.5 x cores), and the output follows the threads.
# tests/data/test_synth.py renders under load and on a dirtied heap and compares bytes.
X264_OPTIONS = {"crf": "12", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode frames as an H.264 mp4 (yuv420p, near-lossless) with PyAV's bundled FFmpeg: the same bytes for the
    same frames on any run (:data:`X264_OPTIONS`; the container holds no clock time)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        stream.options = dict(X264_OPTIONS)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def _make_clips(rng: random.Random, prefix: str, n: int, size: int) -> list[Clip]:
    return [sample_clip(rng, f"{prefix}_{i:05d}", size, travel=size // 5) for i in range(n)]


def _render_all(clips: list[Clip], video_dir: Path, size: int, num_frames: int, fps: int) -> None:
    for clip in clips:
        write_mp4(video_dir / f"{clip.name}.mp4", render(clip, size, num_frames, size // 5), fps)


def balanced_types(rng: random.Random, n: int) -> list[str]:
    """A question type for each of ``n`` clips: every type equally often (the first ``n % 4`` types once more),
    in a random order."""
    types = list(itertools.islice(itertools.cycle(QUESTIONS), n))
    rng.shuffle(types)
    return types


def _answer(clip: Clip, qtype: str) -> str:
    return getattr(clip, QUESTIONS[qtype][2])


def _conversation(clip: Clip, rng: random.Random) -> list[dict]:
    """A multi-turn QA conversation mixing open-ended and multiple-choice turns in random order."""
    turns = []
    for qtype, (question, options, _) in QUESTIONS.items():
        answer = _answer(clip, qtype)
        turns.append((question, answer))
        letter = option_letters(len(options))[options.index(answer)]
        turns.append((mcq_prompt(question, options), letter))
    rng.shuffle(turns)
    turns = turns[: rng.randint(1, 3)]
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<video>\n" if i == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    return conv


def write_dataset(
    out: str | Path,
    *,
    seed: int = SynthSection.seed,
    train_videos: int = SynthSection.train_videos,
    eval_videos: int = SynthSection.eval_videos,
    size: int = SynthSection.size,
    num_frames: int = SynthSection.frames,
    fps: int = SynthSection.fps,
) -> dict:
    """Write the whole synthetic dataset under ``out``; returns a summary dict (also written as ``summary.json``)."""
    if size % 2 or size < 32:
        raise ValueError(f"synth size must be even and >= 32 (H.264 needs even sizes), got {size}")
    if num_frames < 4:
        raise ValueError(f"synth num_frames must be >= 4, got {num_frames}")
    out = Path(out)
    rng = random.Random(seed)

    train_clips = _make_clips(rng, "train", train_videos, size)
    _render_all(train_clips, out / "train" / "videos", size, num_frames, fps)
    align = [
        {
            "id": c.name,
            "video": f"videos/{c.name}.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nDescribe the video."},
                {"from": "gpt", "value": c.caption},
            ],
        }
        for c in train_clips
    ]
    finetune = [
        {"id": f"{c.name}_qa", "video": f"videos/{c.name}.mp4", "conversations": _conversation(c, rng)}
        for c in train_clips
    ]
    _write_json(out / "train" / "align.json", align)
    _write_json(out / "train" / "finetune.json", finetune)

    eval_clips = _make_clips(rng, "eval", eval_videos, size)
    benchmarks = {"synth_mcq": "mcq", "synth_open": "open"}
    for bench, kind in benchmarks.items():
        bench_dir = out / "eval_data" / bench
        _render_all(eval_clips, bench_dir / "videos", size, num_frames, fps)
        questions, answers = [], []
        for c, qtype in zip(eval_clips, balanced_types(rng, len(eval_clips)), strict=True):
            question, options, _ = QUESTIONS[qtype]
            qid = f"{c.name}_{qtype}"
            answer = _answer(c, qtype)
            if kind == "mcq":
                questions.append(
                    {
                        "video_name": c.name,
                        "question_id": qid,
                        "question": question,
                        "options": list(options),
                        "num_option": len(options),
                        "question_type": qtype,
                    }
                )
                answers.append({"question_id": qid, "answer_id": options.index(answer), "answer": answer})
            else:
                questions.append(
                    {"video_name": c.name, "question_id": qid, "question": question, "question_type": qtype}
                )
                answers.append({"question_id": qid, "answer": answer})
        _write_json(bench_dir / "test_q.json", questions)
        _write_json(bench_dir / "test_a.json", answers)

    summary = {
        "seed": seed,
        "size": size,
        "num_frames": num_frames,
        "fps": fps,
        "train_videos": train_videos,
        "eval_videos": eval_videos,
        "benchmarks": benchmarks,
    }
    _write_json(out / "summary.json", summary)
    return summary


def tokenizer_corpus() -> list[str]:
    """Texts the synthetic data can contain, for training the tiny tokenizer."""
    texts = ["Describe the video."]
    for question, options, _ in QUESTIONS.values():
        texts += [question, mcq_prompt(question, options), *options]
    for colour in COLOURS:
        for shape in SHAPES:
            for first in DIRECTIONS:
                for last in DIRECTIONS:
                    texts.append(f"A {colour} {shape} moves {first}, then {last}.")
    # Option letters must each be one token, also after a space (" A"): make those merges frequent.
    texts += [" ".join(option_letters(26))] * 50
    return texts


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
