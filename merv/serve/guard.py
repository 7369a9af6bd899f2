"""What every request of ``merv serve`` passes before its route: the ``Host`` must be one of the server's names (DNS
rebinding), the API key when one is set (every route but ``/health`` and the static page), and a POST from a browser
must come from the server's own page (``Origin``); and how a refusal or an error becomes an OpenAI-style error body.
See ``docs/serving-security.md``.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from merv.serve.protocol import ServeError
from merv.serve.settings import ServeSettings

log = logging.getLogger("merv.serve")
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


def install_guard(app: FastAPI) -> None:
    """:func:`check_request` before every route of ``app`` (settings from ``app.state.settings``), and every error
    answered as an OpenAI-style error body."""
    app.middleware("http")(guard)
    app.add_exception_handler(ServeError, on_serve_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


async def guard(request: Request, call_next):
    try:
        check_request(request, request.app.state.settings)
    except ServeError as e:
        log.info("%s %s refused (%d): %s", request.method, request.url.path, e.status, e.message)
        return error_response(e)
    return await call_next(request)


async def on_serve_error(request: Request, e: ServeError):
    log.info("%s %s refused (%d): %s", request.method, request.url.path, e.status, e.message)
    return error_response(e)


async def on_unexpected_error(request: Request, e: Exception):
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(ServeError(500, f"internal error: {type(e).__name__}: {e}", "internal_error"))


async def on_http_error(request: Request, e: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return error_response(ServeError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code))


async def on_validation_error(request: Request, e: RequestValidationError):
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return error_response(ServeError(400, f"{where}: {first['msg']}", "invalid_request", where))
