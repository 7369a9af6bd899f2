"""A local stand-in for the Hugging Face hub: the part of its HTTP protocol that downloads use (repository info, file
tree, ``resolve`` with the commit and ETag headers), served over real HTTP from a folder of ``<org>/<name>/`` repos.

The hub cannot be reached from tests; ``huggingface_hub`` and timm talk to this server when ``HF_ENDPOINT`` names it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class LocalHub:
    """``with LocalHub(folder) as url:`` serves every ``folder/<org>/<name>`` as model repository ``<org>/<name>``;
    ``requests`` lists the paths asked for."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.requests: list[str] = []

    def __enter__(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 (the http.server interface)
                hub.respond(self, body=False)

            def do_GET(self):  # noqa: N802
                hub.respond(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[Path]:
        root = self.folder / repo
        return sorted(p for p in root.rglob("*") if p.is_file())

    def commit(self, repo: str) -> str:
        """A stable 40-hex commit id of the repository's content."""
        digest = hashlib.sha1()
        for path in self.files(repo):
            digest.update(str(path.relative_to(self.folder / repo)).encode() + path.read_bytes())
        return digest.hexdigest()

    def respond(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = "/".join(parts[2:4])
            if not (self.folder / repo).is_dir():
                error = {"X-Error-Code": "RepoNotFound"}
                return self.send(handler, 404, b'{"error": "Repository not found"}', body, error)
            files = [str(p.relative_to(self.folder / repo)) for p in self.files(repo)]
            if parts[4] == "revision":
                info = {"id": repo, "sha": self.commit(repo), "siblings": [{"rfilename": f} for f in files]}
            else:
                info = [
                    {"type": "file", "path": f, "size": (self.folder / repo / f).stat().st_size,
                     "oid": hashlib.sha1((self.folder / repo / f).read_bytes()).hexdigest()}
                    for f in files
                ]  # fmt: skip
            return self.send(handler, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            file = self.folder / repo / name
            if not file.is_file():
                return self.send(handler, 404, b"Entry not found", body, {"X-Error-Code": "EntryNotFound"})
            data = file.read_bytes()
            headers = {"X-Repo-Commit": self.commit(repo), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            return self.send(handler, 200, data, body, headers)
        self.send(handler, 404, b"not found", body, {})

    @staticmethod
    def send(handler, status: int, data: bytes, body: bool, headers: dict) -> None:
        handler.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **headers}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
