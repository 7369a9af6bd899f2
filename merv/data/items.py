"""Finding what to shard: the items of a Video-LLaVA training JSON, a MERV ``eval_data`` benchmark or a folder of
videos, each with its key, media path and text."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from merv.data.video import FOLDER_FPS, IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif"}


Modality = Literal["video", "image", "text"]
MODALITIES: tuple[str, ...] = get_args(Modality)


@dataclass(frozen=True)
class Item:
    """One thing to shard: a media path (video, image or frame folder) and the text that goes with it, or text
    alone (``media`` None: a text-only conversation)."""

    key: str
    media: Path | None
    record: dict = field(default_factory=dict)  # conversation (training) or question + answer (evaluation)
    time: tuple[float, float] | None = None  # clip window in seconds
    end_frame: int | None = None
    modality: Modality = "video"
    folder_fps: float = FOLDER_FPS  # frames a second of a folder of frames (VLEP's: 3)

    def __post_init__(self):
        if (self.media is None) != (self.modality == "text"):
            raise ValueError(f"item {self.key!r}: modality {self.modality!r} with media {self.media}")


class DataFormatError(ValueError):
    """An input file that is not in the format it claims to be."""


# ------------------------------------------------------------------------------------------------------------------
# Inputs


def _safe_key(text: str) -> str:
    # WebDataset splits member names at the first dot: keys stay dot-free and path-safe.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def load_json_list(path: Path) -> list:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


def training_media(sample: dict, where: str) -> tuple[str | None, Modality]:
    """The media path of a training sample and its modality; a sample with neither key is text-only (as in
    LLaVA-665k and Video-LLaVA's stage-2 data)."""
    kind = "video" if "video" in sample else "image" if "image" in sample else None
    if kind is None:
        return None, "text"
    media = sample[kind]
    if isinstance(media, list):
        raise DataFormatError(f"{where}: {kind!r} is a list; one media path per sample is supported")
    if not isinstance(media, str) or not media.strip():
        raise DataFormatError(f"{where}: {kind!r} must be a non-empty path, got {media!r}")
    return media, kind


def training_items(json_path: Path, root: Path | None = None) -> list[Item]:
    """Items of a Video-LLaVA training JSON (video, image and text-only samples); media paths resolve against
    ``root`` (default: the JSON's folder)."""
    root = root or json_path.parent
    items = []
    for i, sample in enumerate(load_json_list(json_path)):
        where = f"{json_path} sample {i}"
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise DataFormatError(f"{where}: expected an object with a 'conversations' list")
        media, modality = training_media(sample, f"{where} (id {sample.get('id')!r})")
        key = _safe_key(str(sample.get("id", i)))
        record = {"id": sample.get("id", i), "conversations": sample["conversations"]}
        items.append(Item(key, None if media is None else root / media, record, modality=modality))
    return items


def benchmark_items(bench_dir: Path) -> list[Item]:
    """Items of a MERV ``eval_data/<benchmark>`` folder: ``test_q.json`` joined with ``test_a.json`` on
    ``question_id``; videos are ``videos/<video_name>.<ext>`` or folders of frames ``videos/<video_name>/``, at the
    frame rate the benchmark registry gives the folder's name (VLEP: 3 fps, as the original reads them)."""
    from merv.data.benchmarks import lookup  # the benchmarks' layout facts are data in one table

    questions = load_json_list(bench_dir / "test_q.json")
    answers = {a["question_id"]: a for a in load_json_list(bench_dir / "test_a.json")}
    video_dir = bench_dir / "videos"
    videos = {p.stem if p.is_file() else p.name: p for p in video_dir.iterdir()} if video_dir.is_dir() else {}
    folder_fps = lookup(bench_dir.name, questions[0] if questions else {}).folder_fps
    items = []
    for i, q in enumerate(questions):
        qid = q.get("question_id") if isinstance(q, dict) else None
        if qid is None or "video_name" not in q or "question" not in q:
            raise DataFormatError(f"{bench_dir}/test_q.json entry {i}: needs question_id, video_name and question")
        if qid not in answers:
            raise DataFormatError(f"{bench_dir}/test_q.json: question {qid!r} has no answer in test_a.json")
        name = str(q["video_name"])
        record = {**q, "answer": answers[qid]["answer"], "kind": "mcq" if "options" in q else "open"}
        if "answer_id" in answers[qid]:
            record["answer_id"] = answers[qid]["answer_id"]
        window = tuple(q["time"]) if q.get("time") is not None else None
        end_frame = q.get("end_frame")
        media = videos.get(name, video_dir / f"{name}.mp4")
        items.append(Item(_safe_key(str(qid)), media, record, window, end_frame, folder_fps=folder_fps))
    return items


def folder_items(folder: Path) -> list[Item]:
    """Every video or image below ``folder`` (sorted by relative path), with no text."""
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
    )
    if not paths:
        raise DataFormatError(f"{folder}: no video or image files found")
    return [
        Item(
            _safe_key(str(p.relative_to(folder).with_suffix(""))),
            p,
            {"source": str(p)},
            modality="image" if p.suffix.lower() in IMAGE_EXTENSIONS else "video",
        )
        for p in paths
    ]


def collect_items(sources: Path | list[Path], root: Path | None = None) -> list[Item]:
    """Items of one or more inputs (training JSON, benchmark folder, folder of videos), keys checked unique."""
    items = []
    for source in [sources] if isinstance(sources, Path) else sources:
        source = Path(source)
        if source.suffix == ".json" and not source.is_dir():
            items += training_items(source, root)
        elif source.is_dir() and (source / "test_q.json").is_file():
            items += benchmark_items(source)
        elif source.is_dir():
            items += folder_items(source)
        else:
            raise DataFormatError(f"{source}: not a training JSON, an eval_data benchmark folder or a folder of videos")
    duplicates = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if duplicates:
        raise DataFormatError(f"duplicate sample keys (ids) across the inputs, e.g. {duplicates[:5]}")
    return items
