"""What a number was measured with: checkpoint, frames, decoding, prompt, judge and software, recorded per result."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("merv", "torch", "transformers", "timm", "tokenizers", "openai", "webdataset", "decord2", "av")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
