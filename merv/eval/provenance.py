"""What a number was measured with: checkpoint, frozen weights, frames, decoding, prompt, judge and software, recorded
per result."""

from __future__ import annotations

import logging
import platform
import subprocess
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)
PACKAGES = ("merv", "torch", "transformers", "timm", "tokenizers", "openai", "webdataset", "decord2", "av")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the merv source tree in use, when it is a git checkout (None otherwise)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def frame_sampling(model_cfg, shard_manifest: dict) -> dict:
    """Per encoder: frames and input size; and how the shards were sampled (uniform in the clip window)."""
    return {
        "encoders": {
            e.id: {"kind": e.kind, "num_frames": e.num_frames, "image_size": e.image_size} for e in model_cfg.encoders
        },
        "shards": {"fingerprint": shard_manifest.get("fingerprint"), "settings": shard_manifest.get("settings")},
        "sampling": "uniform over the clip (or its time window / end_frame), per encoder frame count",
    }


def weights_provenance(paths: dict[str, Path], memo) -> dict[str, dict]:
    """Per frozen weight (``{"encoder <id>" or "llm": path}``, see :func:`merv.weights.weight_paths`): where it was
    found, its digest, and what `merv fetch-weights` recorded beside it (source, pinned revision, commit, per-file
    digests) when it fetched it, with whether the files still match that record."""
    from merv.fetch import read_source_record

    out = {}
    for part, path in paths.items():
        path = Path(path)
        record = read_source_record(path)
        entry = {"path": str(path), "sha256": memo.path(path), "fetched": None}
        if record:
            files = memo.files(path) if path.is_dir() else {path.name: memo.file(path)}
            entry["fetched"] = {k: record.get(k) for k in ("source", "revision", "commit", "files")}
            entry["fetched"]["unchanged"] = files == record.get("files")
            if not entry["fetched"]["unchanged"]:
                log.warning("%s: %s differs from what merv fetch-weights fetched (commit %s)", part, path,
                            record.get("commit"))  # fmt: skip
        out[part] = entry
    return out
