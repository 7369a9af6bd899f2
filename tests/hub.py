"""A local stand-in for the Hugging Face hub: the part of its HTTP protocol that downloads use (repository info, file
tree, ``resolve`` with the commit and ETag headers, each at a revision), served over real HTTP from a folder of
``<org>/<name>/`` repos.

A repository folder holds its files (one revision, whose commit is a digest of them), or one ``@<commit>/`` folder per
commit plus a ``@main`` file naming the commit ``main`` points to. A request for a revision that is not there gets
the hub's 404 (``RevisionNotFound``). The hub cannot be reached from tests; ``huggingface_hub`` and timm talk to
this server when ``HF_ENDPOINT`` names it.
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

    def revisions(self, repo: str) -> dict[str, Path]:
        """``{commit: folder}`` of a repository (one revision when it holds its files directly)."""
        root = self.folder / repo
        pinned = {d.name[1:]: d for d in root.iterdir() if d.is_dir() and d.name.startswith("@")}
        return pinned or {self.commit(repo): root}

    def resolve(self, repo: str, revision: str) -> tuple[str, Path] | None:
        """``(commit, folder)`` that ``revision`` (a commit or ``main``) names, or None."""
        revisions = self.revisions(repo)
        if revision == "main":
            main = self.folder / repo / "@main"
            revision = main.read_text().strip() if main.is_file() else next(iter(revisions))
        return (revision, revisions[revision]) if revision in revisions else None

    def files(self, repo: str, folder: Path | None = None) -> list[Path]:
        root = folder or self.folder / repo
        return sorted(p for p in root.rglob("*") if p.is_file() and not p.relative_to(root).parts[0].startswith("@"))

    def commit(self, repo: str) -> str:
        """A stable 40-hex commit id of a single-revision repository's content."""
        digest = hashlib.sha1()
        for path in self.files(repo):
            digest.update(str(path.relative_to(self.folder / repo)).encode() + path.read_bytes())
        return digest.hexdigest()

    def respond(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if not (self.folder / repo).is_dir():
                error = {"X-Error-Code": "RepoNotFound"}
                return self.send(handler, 404, b'{"error": "Repository not found"}', body, error)
            kind = parts[4] if len(parts) >= 6 and parts[4] in ("revision", "tree") else "revision"
            found = self.resolve(repo, parts[5] if len(parts) >= 6 else "main")
            if found is None:
                error = {"X-Error-Code": "RevisionNotFound"}
                return self.send(handler, 404, b'{"error": "Invalid rev id"}', body, error)
            commit, folder = found
            files = [str(p.relative_to(folder)) for p in self.files(repo, folder)]
            if kind == "revision":
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
            else:
                info = [
                    {"type": "file", "path": f, "size": (folder / f).stat().st_size,
                     "oid": hashlib.sha1((folder / f).read_bytes()).hexdigest()}
                    for f in files
                ]  # fmt: skip
            return self.send(handler, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            found = self.resolve(repo, parts[3]) if (self.folder / repo).is_dir() else None
            if found is None:
                return self.send(handler, 404, b"Revision not found", body, {"X-Error-Code": "RevisionNotFound"})
            commit, folder = found
            file = folder / name
            if not file.is_file():
                return self.send(handler, 404, b"Entry not found", body, {"X-Error-Code": "EntryNotFound"})
            data = file.read_bytes()
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
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
