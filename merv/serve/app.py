"""The HTTP side of ``merv serve``: OpenAI-compatible routes, the chat page and its helpers, and :func:`serve`.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models[/{id}]``, ``GET /health`` (with batching statistics);
the chat page ``GET /`` (static files under ``/static``), ``GET /api/videos`` (videos in the allowed folders),
``GET /api/media`` (one of them, for the page's <video>), ``POST /api/uploads`` (a video from the page).

Every request passes :func:`guard` first: its ``Host`` must be one of the server's names (DNS rebinding), the API key
when one is set (every route but ``/health`` and the static page), and a POST from a browser must come from the
server's own page (``Origin``); chat completions take JSON bodies only. See ``docs/serving-security.md``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import mimetypes
import re
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from merv.data.video import VideoError, open_media
from merv.serve.chat import prepare_job
from merv.serve.engine import BatchEngine, Result
from merv.serve.media import MEDIA_SUFFIXES, VIDEO_SUFFIXES, MediaPolicy, list_videos
from merv.serve.protocol import (
    ServeError,
    chunk_body,
    completion_body,
    completion_id,
    parse_request,
    usage,
)
from merv.serve.settings import MIB, ServeSettings

log = logging.getLogger("merv.serve")
STATIC = Path(__file__).parent / "static"
TEXT_ALLOWANCE = MIB  # room for the text of a request beside its base64 media
MAX_UPLOADS = 64  # videos the chat page's upload folder keeps


PUBLIC_PATHS = ("/health",)  # no key needed: liveness probes
PAGE_PATHS = ("/", "/favicon.ico")  # the chat page and its static files: the same for everyone, no data
JSON_TYPES = ("application/json",)


def error_response(e: ServeError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def host_name(header: str) -> str:
    """A Host header's name, lower case, without the port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def check_request(request: Request, settings: ServeSettings) -> None:
    """The checks every request passes before its route runs; a :class:`ServeError` says which failed."""
    names = settings.host_names
    host = host_name(request.headers.get("host", ""))
    if names is not None and host not in names:
        # DNS rebinding: a web page whose name now resolves to this server still sends its own name
        raise ServeError(400, f"Host {host!r} is not a name of this server (see --allowed-host)", "invalid_host")
    path = request.url.path
    public = path in PUBLIC_PATHS or path in PAGE_PATHS or path.startswith("/static/")
    if settings.api_key is not None and not public:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ServeError(401, "a valid API key is needed: 'Authorization: Bearer <key>'", "invalid_api_key")
    origin = request.headers.get("origin")
    if request.method not in ("GET", "HEAD", "OPTIONS") and origin is not None:
        # a browser says where a request comes from; only the server's own page may POST (no cross-site forms)
        parsed = urlparse(origin)
        own = parsed.scheme in ("http", "https") and parsed.netloc.lower() == request.headers.get("host", "").lower()
        if not own:
            raise ServeError(403, f"requests from {origin!r} are not accepted (cross-origin)", "cross_origin")


def require_json(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in JSON_TYPES:
        raise ServeError(
            415,
            f"the body must be JSON (Content-Type: application/json), got {kind or 'none'!r}",
            "unsupported_media_type",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it is over ``limit`` bytes, declared or read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body of {declared} bytes is over the limit of {limit}", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ServeError(413, f"request body is over the limit of {limit} bytes", "request_too_large")
    return bytes(body)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(model, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``model`` (already placed on its device) with ``settings``."""
    name = settings.served_model_name or model.cfg.name
    created = int(time.time())
    uploads = Path(tempfile.mkdtemp(prefix="merv-serve-uploads-"))
    roots = {Path(d).name: Path(d) for d in settings.allowed_dirs} | {"uploads": uploads}
    policy = MediaPolicy(
        tuple(roots.values()),
        settings.max_upload_bytes,
        settings.download_timeout_s,
        allowed_domains=tuple(d.rstrip(".").lower() for d in settings.allowed_media_domains),
        allowed_networks=settings.allowed_media_networks,
        max_redirects=settings.max_media_redirects,
        max_frame_pixels=settings.max_frame_pixels,
        max_request_pixels=settings.max_request_pixels,
    )
    engine = BatchEngine(model, settings.max_batch, settings.batch_wait_ms)
    body_limit = settings.max_upload_bytes * 4 // 3 + TEXT_ALLOWANCE  # base64 grows media by 4/3

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()
        shutil.rmtree(uploads, ignore_errors=True)

    app = FastAPI(title="merv serve", lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            check_request(request, settings)
        except ServeError as e:
            log.info("%s %s refused (%d): %s", request.method, request.url.path, e.status, e.message)
            return error_response(e)
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, e: ServeError):
        log.info("%s %s refused (%d): %s", request.method, request.url.path, e.status, e.message)
        return error_response(e)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(ServeError(500, f"internal error: {type(e).__name__}: {e}", "internal_error"))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(ServeError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return error_response(ServeError(400, f"{where}: {first['msg']}", "invalid_request", where))

    # -- OpenAI-compatible -----------------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "merv"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id != name:
            raise ServeError(
                404, f"model {model_id!r} is not served here (serving {name!r})", "model_not_found", "model"
            )
        return model_card()

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": name,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "queued": engine.queue.qsize(),
            "max_batch": settings.max_batch,
            **engine.stats.to_dict(),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        require_json(request)
        body = await read_body(request, body_limit)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer of more than 4300 digits
            raise ServeError(400, f"the request body is not JSON ({str(e)[:200]})", "invalid_json") from None
        except RecursionError:
            raise ServeError(400, "the request body is nested too deeply", "invalid_json") from None
        req = parse_request(data)
        if req.model != name:
            raise ServeError(
                404, f"model {req.model!r} is not served here (serving {name!r})", "model_not_found", "model"
            )
        with tempfile.TemporaryDirectory(prefix="merv-serve-") as workdir:
            job, prompt_tokens = await prepare_job(model, policy, req, Path(workdir), settings.default_max_tokens)
        cid = completion_id()
        if req.stream:
            job.stream = asyncio.Queue()
            engine.submit(job)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream_events(job, cid, prompt_tokens, include_usage), media_type="text/event-stream"
            )
        job.future = asyncio.get_running_loop().create_future()
        engine.submit(job)
        try:
            result = await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        except Exception as e:
            raise ServeError(500, f"generation failed: {e}", "generation_failed") from None
        return completion_body(
            cid, name, result.text, result.finish_reason, usage(prompt_tokens, result.completion_tokens)
        )

    async def stream_events(job, cid: str, prompt_tokens: int, include_usage: bool):
        """``chat.completion.chunk`` events: the role, text deltas, the finish reason, [usage], then ``[DONE]``."""
        try:
            yield sse(chunk_body(cid, name, {"role": "assistant", "content": ""}))
            while True:
                item = await job.stream.get()
                if isinstance(item, str):
                    yield sse(chunk_body(cid, name, {"content": item}))
                    continue
                if isinstance(item, Result):
                    yield sse(chunk_body(cid, name, {}, item.finish_reason))
                    if include_usage:
                        yield sse(chunk_body(cid, name, {}, usage_=usage(prompt_tokens, item.completion_tokens)))
                else:  # the status line is sent already: report the failure in the stream, as vLLM does
                    yield sse(ServeError(500, f"generation failed: {item}", "generation_failed").body())
                break
            yield sse("[DONE]")
        finally:
            job.cancelled = True  # a client gone mid-answer frees its row at the next token

    # -- the chat page ---------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/videos")
    async def videos():
        found = await asyncio.to_thread(list_videos, roots)
        return {"model": name, "videos": found, "max_upload_bytes": settings.max_upload_bytes}

    @app.get("/api/media")
    async def media(url: str):
        path = policy.local_path(url, "url")
        if not path.is_file():
            raise ServeError(400, f"url: {path} is not a file", "invalid_video", "url")
        if path.suffix.lower() not in MEDIA_SUFFIXES:  # e.g. a benchmark's answers beside its videos
            raise ServeError(403, f"url: {path.name} is not a video or image file", "not_media", "url")
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.post("/api/uploads")
    async def upload(request: Request):
        """A video from the page (multipart field ``file``), kept in a temporary folder until the server stops."""
        declared = request.headers.get("content-length")
        if not (declared and declared.isdigit()):
            raise ServeError(411, "uploads need a Content-Length header", "length_required")
        if int(declared) > settings.max_upload_bytes + TEXT_ALLOWANCE:
            raise policy.too_large("file", declared)
        form = await request.form(max_files=1, max_fields=4)
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise ServeError(400, "file: a multipart upload needs a 'file' field", "invalid_request", "file")
        suffix = Path(file.filename or "").suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            raise ServeError(
                400,
                f"file: {file.filename!r} is not a video file name ({', '.join(sorted(VIDEO_SUFFIXES))})",
                "invalid_video",
                "file",
            )
        if file.size is not None and file.size > settings.max_upload_bytes:
            raise policy.too_large("file", file.size)
        forget_old_uploads(uploads)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(file.filename).stem)[:64]
        path = uploads / f"{uuid.uuid4().hex[:8]}-{stem}{suffix}"
        with path.open("wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, file.file, out)
        try:
            await asyncio.to_thread(lambda: open_media(path).close())
        except VideoError as e:
            path.unlink()
            raise ServeError(400, f"file: {file.filename!r}: {e.reason}", "invalid_video", "file") from None
        return {"name": f"uploads/{path.name}", "url": path.as_uri(), "bytes": path.stat().st_size}

    app.state.engine = engine
    app.state.settings = settings
    return app


def forget_old_uploads(folder: Path, keep: int = MAX_UPLOADS - 1) -> None:
    """Bound the upload folder: the oldest uploads go first."""
    files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    for path in files[: max(0, len(files) - keep)]:
        path.unlink(missing_ok=True)


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), so the port can be printed before uvicorn starts."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=256)
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeSettings) -> None:
    """Load the model, then serve until interrupted."""
    import uvicorn

    from merv.api import load_vid
    from merv.serve.chat import check_eos_text

    model = load_vid(settings.model, device=settings.device, dtype=settings.dtype)
    check_eos_text(model.tokenizer)
    app = create_app(model, settings)
    sock = open_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5)
    log.info("serving %s on %s, dtype %s", settings.served_model_name or model.cfg.name, model.device, model.dtype)
    print(f"merv serve: listening on http://{host}:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
