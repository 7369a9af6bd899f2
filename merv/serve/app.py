"""The HTTP side of ``merv serve``: the app (:func:`create_app`) and :func:`serve`.

The app is one router per concern: the OpenAI-compatible routes (:mod:`merv.serve.openai_routes`:
``POST /v1/chat/completions``, ``GET /v1/models[/{id}]``, ``GET /health``) and the chat page with its helpers
(:mod:`merv.serve.page_routes`: ``GET /``, ``/static``, ``GET /api/videos``, ``GET /api/media``,
``POST /api/uploads``). What they share is a :class:`merv.serve.context.Served`. Every request passes
:mod:`merv.serve.guard` first (Host, API key, Origin); see ``docs/serving-security.md``.
"""

from __future__ import annotations

import logging
import shutil
import socket
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from merv.serve import openai_routes, page_routes
from merv.serve.context import Served
from merv.serve.guard import install_guard
from merv.serve.settings import ServeSettings

log = logging.getLogger("merv.serve")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """The batching engine runs while the app does; the uploads go when it stops."""
    s: Served = app.state.served
    s.engine.start()
    yield
    await s.engine.stop()
    shutil.rmtree(s.uploads, ignore_errors=True)


def create_app(model, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``model`` (already placed on its device) with ``settings``."""
    served = Served.create(model, settings)
    app = FastAPI(title="merv serve", lifespan=lifespan)
    app.state.served, app.state.engine, app.state.settings = served, served.engine, settings
    app.mount("/static", StaticFiles(directory=page_routes.STATIC), name="static")
    install_guard(app)
    app.include_router(openai_routes.router)
    app.include_router(page_routes.router)
    return app


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
