"""The chat page of ``merv serve`` and its helpers: ``GET /`` (static files under ``/static``), ``GET /api/videos``
(videos in the allowed folders), ``GET /api/media`` (one of them, for the page's <video>), ``POST /api/uploads``
(a video from the page)."""

from __future__ import annotations

import asyncio
import mimetypes
import re
import shutil
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from merv.data.video import VideoError, open_media
from merv.serve.context import TEXT_ALLOWANCE, ServedDep
from merv.serve.media import MEDIA_SUFFIXES, VIDEO_SUFFIXES, list_videos
from merv.serve.protocol import ServeError

STATIC = Path(__file__).parent / "static"
MAX_UPLOADS = 64  # videos the chat page's upload folder keeps

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/api/videos")
async def videos(s: ServedDep):
    found = await asyncio.to_thread(list_videos, s.roots)
    return {"model": s.name, "videos": found, "max_upload_bytes": s.settings.max_upload_bytes}


@router.get("/api/media")
async def media(url: str, s: ServedDep):
    path = s.policy.local_path(url, "url")
    if not path.is_file():
        raise ServeError(400, f"url: {path} is not a file", "invalid_video", "url")
    if path.suffix.lower() not in MEDIA_SUFFIXES:  # e.g. a benchmark's answers beside its videos
        raise ServeError(403, f"url: {path.name} is not a video or image file", "not_media", "url")
    return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")


@router.post("/api/uploads")
async def upload(request: Request, s: ServedDep):
    """A video from the page (multipart field ``file``), kept in a temporary folder until the server stops."""
    limit = s.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if not (declared and declared.isdigit()):
        raise ServeError(411, "uploads need a Content-Length header", "length_required")
    if int(declared) > limit + TEXT_ALLOWANCE:
        raise s.policy.too_large("file", declared)
    form = await request.form(max_files=1, max_fields=4)
    file = form.get("file")
    if file is None or isinstance(file, str):
        raise ServeError(400, "file: a multipart upload needs a 'file' field", "invalid_request", "file")
    suffix = Path(file.filename or "").suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        names = ", ".join(sorted(VIDEO_SUFFIXES))
        raise ServeError(400, f"file: {file.filename!r} is not a video file name ({names})", "invalid_video", "file")
    if file.size is not None and file.size > limit:
        raise s.policy.too_large("file", file.size)
    forget_old_uploads(s.uploads)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(file.filename).stem)[:64]
    path = s.uploads / f"{uuid.uuid4().hex[:8]}-{stem}{suffix}"
    with path.open("wb") as out:
        await asyncio.to_thread(shutil.copyfileobj, file.file, out)
    try:
        await asyncio.to_thread(lambda: open_media(path).close())
    except VideoError as e:
        path.unlink()
        raise ServeError(400, f"file: {file.filename!r}: {e.reason}", "invalid_video", "file") from None
    return {"name": f"uploads/{path.name}", "url": path.as_uri(), "bytes": path.stat().st_size}


def forget_old_uploads(folder: Path, keep: int = MAX_UPLOADS - 1) -> None:
    """Bound the upload folder: the oldest uploads go first."""
    files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    for path in files[: max(0, len(files) - keep)]:
        path.unlink(missing_ok=True)
