"""A stat-based index of the media a data source reads, so that a video replaced in place reaches a pipeline rerun.

Snakemake reruns a job when one of its input files is newer than its outputs, so every file a job reads should be an
input. Listing each of a split's videos would make planning slow (hundreds of thousands of inputs); instead the shard
rules read one small index per source (``data/media/train/<split>.json``, ``data/media/eval/<bench>.json``): every
media path with its size and mtime (ns). The pipeline rewrites an index when it plans (:func:`refresh_index`, from
the Snakefile, main process only) and only when what it lists changed, so its own mtime moves exactly when a video is
added, removed, replaced or touched -- the same rule Snakemake applies to the files it tracks itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "merv-media-index/1"


def source_media(source: Path, root: Path | None = None) -> list[Path]:
    """The media paths a source reads: a training JSON's ``video``/``image`` paths (against ``root``, default its
    folder), or every file under a benchmark's ``videos/`` (frame folders included), or under a folder of videos."""
    from merv.data.shards import _load_json_list, _training_media

    source = Path(source)
    if source.suffix == ".json" and not source.is_dir():
        base = root or source.parent
        out = []
        for i, sample in enumerate(_load_json_list(source)):
            media, _ = _training_media(sample, f"{source} sample {i}") if isinstance(sample, dict) else (None, None)
            if media is not None:
                out.append(base / media)
        return sorted(set(out))
    folder = source / "videos" if (source / "test_q.json").is_file() else source
    files = []
    for dirpath, _, names in os.walk(folder):
        files += [Path(dirpath) / n for n in names]
    return sorted(files)


def _stat(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def build_index(source: Path, root: Path | None = None) -> dict:
    """The index of a source: its own stat (a training JSON lists the media) and every media path's size and mtime.
    A source that cannot be read gets an index without media: the shard job, which reads it next, names the problem
    (this index only tells Snakemake when to run it)."""
    from merv.data.shards import DataFormatError

    source = Path(source)
    try:
        media, problem = [_stat(p) for p in source_media(source, root)], None
    except (DataFormatError, OSError) as e:
        media, problem = [], str(e)
    return {
        "format": FORMAT,
        "source": str(source),
        "root": None if root is None else str(root),
        "source_stat": _stat(source) if source.is_file() else None,
        "media": media,
        "problem": problem,
    }


def write_index(index: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(index, separators=(",", ":")))
    tmp.replace(out)


def refresh_index(out: Path) -> bool:
    """Rewrite an existing index whose media changed (size, mtime, added or removed files); returns whether it did.
    The listed paths are stat'ed again; a training JSON is read again only when the JSON itself changed."""
    out = Path(out)
    try:
        index = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False  # none yet (the index rule writes it), or unreadable: the index rule rewrites it
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        return False
    source = Path(index["source"])
    root = Path(index["root"]) if index.get("root") else None
    if source.is_dir() or index.get("source_stat") != _stat(source):
        fresh = build_index(source, root) if source.exists() else None
    else:
        fresh = {**index, "media": [_stat(Path(p)) for p, _, _ in index["media"]]}
    if fresh is None or fresh == index:
        return False
    write_index(fresh, out)
    return True
