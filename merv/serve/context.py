"""What the routes of ``merv serve`` share: the model and its name, the settings, the batching engine, the media
policy and the upload folder; one :class:`Served` per app, in ``app.state.served``."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from merv.serve.engine import BatchEngine
from merv.serve.media import MediaPolicy
from merv.serve.protocol import ServeError
from merv.serve.settings import MIB, ServeSettings

TEXT_ALLOWANCE = MIB  # room for the text of a request beside its base64 media


@dataclass
class Served:
    model: object  # MERV, already placed on its device
    settings: ServeSettings
    name: str  # the model id clients ask for
    uploads: Path  # the chat page's uploads, removed when the server stops
    roots: dict[str, Path]  # folder name -> allowed folder (with ``uploads``)
    policy: MediaPolicy
    engine: BatchEngine
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def create(cls, model, settings: ServeSettings) -> Served:
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
        return cls(model, settings, settings.served_model_name or model.cfg.name, uploads, roots, policy, engine)

    @property
    def body_limit(self) -> int:
        """The largest request body: the largest media in base64 (4/3 of its bytes) and its text."""
        return self.settings.max_upload_bytes * 4 // 3 + TEXT_ALLOWANCE

    def check_model(self, asked: str) -> None:
        """Refuse (404) a request for another model than the one served."""
        if asked != self.name:
            message = f"model {asked!r} is not served here (serving {self.name!r})"
            raise ServeError(404, message, "model_not_found", "model")

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "merv"}


def served(request: Request) -> Served:
    """The app's :class:`Served` (a FastAPI dependency of every route)."""
    return request.app.state.served


ServedDep = Annotated[Served, Depends(served)]  # a route's parameter ``s: ServedDep`` receives it
