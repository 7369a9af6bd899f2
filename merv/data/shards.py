"""Sharding: training JSON or an eval_data benchmark -> WebDataset tars of pre-sampled frames + ``manifest.json``.

Each sample stores, once, the union of every configured frame count's uniform samples at the largest encoder size
(``frames.npy``, uint8 ``[F, S, S, 3]``) and a ``json`` record with its key, source path, the positions of each
frame count inside that stack, and its conversation or question. Training then never touches an mp4 again.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merv.config import fingerprint
from merv.data.video import read_frames


@dataclass(frozen=True)
class Item:
    """One thing to shard: a video and the text that goes with it."""

    key: str
    video: Path
    record: dict  # conversation (training) or question + answer (evaluation)


class DataFormatError(ValueError):
    """An input file that is not in the format it claims to be."""


def _safe_key(text: str) -> str:
    # WebDataset splits keys on the first dot of the member name: keep keys dot-free and path-safe.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _load_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


def training_items(json_path: Path, root: Path | None = None) -> list[Item]:
    """Items of a Video-LLaVA training JSON; video paths resolve against ``root`` (default: the JSON's folder)."""
    root = root or json_path.parent
    items = []
    for i, sample in enumerate(_load_json_list(json_path)):
        where = f"{json_path} sample {i}"
        if not isinstance(sample, dict) or "conversations" not in sample:
            raise DataFormatError(f"{where}: expected an object with 'conversations'")
        media = sample.get("video") or sample.get("image")
        if not media:
            raise DataFormatError(f"{where} (id {sample.get('id')!r}): no 'video' or 'image' path")
        key = _safe_key(str(sample.get("id", i)))
        items.append(Item(key, root / media, {"id": sample.get("id", i), "conversations": sample["conversations"]}))
    return items


def benchmark_items(bench_dir: Path) -> list[Item]:
    """Items of a MERV ``eval_data/<benchmark>`` folder: ``test_q.json`` joined with ``test_a.json``."""
    questions = _load_json_list(bench_dir / "test_q.json")
    answers = {a["question_id"]: a for a in _load_json_list(bench_dir / "test_a.json")}
    videos = {p.stem: p for p in (bench_dir / "videos").iterdir()} if (bench_dir / "videos").is_dir() else {}
    items = []
    for q in questions:
        qid = q.get("question_id")
        if qid not in answers:
            raise DataFormatError(f"{bench_dir}/test_q.json: question {qid!r} has no answer in test_a.json")
        name = str(q["video_name"])
        video = videos.get(name, bench_dir / "videos" / f"{name}.mp4")
        record = {**q, "answer": answers[qid]["answer"], "kind": "mcq" if "options" in q else "open"}
        if "answer_id" in answers[qid]:
            record["answer_id"] = answers[qid]["answer_id"]
        items.append(Item(_safe_key(str(qid)), video, record))
    return items


def collect_items(source: Path, root: Path | None = None) -> list[Item]:
    if source.is_file() and source.suffix == ".json":
        return training_items(source, root)
    if source.is_dir() and (source / "test_q.json").is_file():
        return benchmark_items(source)
    raise DataFormatError(f"{source}: neither a training JSON file nor an eval_data benchmark folder (test_q.json)")


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # deterministic tars: same input and settings, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def _encode_sample(item: Item, frame_counts: list[int], size: int) -> dict[str, bytes]:
    frames, positions = read_frames(item.video, frame_counts, size)
    buf = io.BytesIO()
    np.save(buf, frames)
    meta = {
        "key": item.key,
        "source": str(item.video),
        "frame_positions": {str(c): p for c, p in positions.items()},
        **item.record,
    }
    return {"frames.npy": buf.getvalue(), "json": json.dumps(meta).encode()}


def write_shards(
    items: list[Item], out: Path, *, frame_counts: list[int], size: int, samples_per_shard: int = 256
) -> dict:
    """Write ``items`` into ``out/shard-NNNNNN.tar`` (each written to a temp name, then renamed) + manifest."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {"frame_counts": sorted(set(frame_counts)), "size": size, "samples_per_shard": samples_per_shard}
    shards = []
    start = time.time()
    for first in range(0, len(items), samples_per_shard):
        chunk = items[first : first + samples_per_shard]
        name = f"shard-{len(shards):06d}.tar"
        tmp = out / (name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for item in chunk:
                for ext, payload in _encode_sample(item, frame_counts, size).items():
                    _add_member(tar, f"{item.key}.{ext}", payload)
        tmp.replace(out / name)
        shards.append({"name": name, "samples": len(chunk), "sha256": _sha256(out / name)})
    manifest = {
        "samples": len(items),
        "shards": shards,
        "settings": settings,
        "fingerprint": fingerprint(settings),
        "seconds": round(time.time() - start, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{shard_dir}: no manifest.json (not a merv shard folder; run `merv shard` first)")
    return json.loads(path.read_text())


def iter_samples(shard_dir: Path, shuffle_buffer: int = 0, seed: int = 0) -> Iterator[dict]:
    """Decoded samples ``{"frames": uint8 [F, S, S, 3], "meta": {...}}`` in shard order (or buffer-shuffled)."""
    import webdataset as wds

    manifest = read_manifest(shard_dir)
    urls = [str(Path(shard_dir) / s["name"]) for s in manifest["shards"]]
    pipeline = [wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode()]
    if shuffle_buffer:
        pipeline.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed)))
    for sample in wds.DataPipeline(*pipeline):
        yield {"frames": sample["frames.npy"], "meta": sample["json"]}
