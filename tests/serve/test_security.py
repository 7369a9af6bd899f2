"""``merv serve`` turned against its host, the way a hostile web page or client would try: every case is the exact
attack, against the real app (in this process, through ASGI) or the real server (a subprocess on loopback)."""

from __future__ import annotations

import functools
import io
import json
import random
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from merv.serve.app import create_app
from merv.serve.settings import ServeSettings
from tests.serve.conftest import data_url, video_message


@pytest.fixture(scope="module")
def make_client(tiny_model, video_dir):
    """``make_client(**settings)``: a TestClient of the app with these settings (the tiny model, on CPU)."""
    clients = []

    def make(host_header: str = "127.0.0.1:8000", **settings) -> TestClient:
        settings = {"model": "unused", "allowed_dirs": (video_dir,), "max_upload_mb": 1.0, **settings}
        client = TestClient(create_app(tiny_model, ServeSettings(**settings)), base_url=f"http://{host_header}")
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def chat(client, messages, headers=None, **kw) -> httpx.Response:
    body = {"model": "merv-tiny", "messages": messages, "max_tokens": 2, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


class LoggingHandler(SimpleHTTPRequestHandler):
    """A file server that logs every request and redirects ``/go?to=URL``."""

    seen: list[str]

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append(self.path)
        if self.path.startswith("/go?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


@pytest.fixture(scope="module")
def media_site(tmp_path_factory, video_dir):
    """A web server on loopback with a clip (what SSRF would reach: any local port)."""
    root = tmp_path_factory.mktemp("site")
    clip = sorted(video_dir.glob("eval_*.mp4"))[0]
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    seen: list[str] = []
    handler = functools.partial(type("H", (LoggingHandler,), {"seen": seen}), directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], seen
    httpd.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------------------
# SSRF
def test_http_media_is_off_by_default_and_no_local_port_is_probed(make_client, media_site):
    port, seen = media_site
    client = make_client()
    seen.clear()
    open_, closed = (
        chat(client, video_message(f"http://127.0.0.1:{port}/clip.mp4")),
        chat(client, video_message(f"http://127.0.0.1:{closed_port()}/clip.mp4")),
    )
    assert seen == [], f"the server fetched a local URL: {seen}"
    assert open_.status_code == closed.status_code == 403, (open_.text, closed.text)
    assert error_of(open_)["code"] == error_of(closed)["code"] == "media_url_not_allowed"
    assert "--allowed-media-domain" in error_of(open_)["message"]


def test_allowed_domains_are_checked_after_resolution_and_on_every_redirect(make_client, media_site):
    port, seen = media_site
    seen.clear()
    # an allowed name that resolves to loopback: refused after resolution, before connecting
    by_name = make_client(allowed_media_domains=("localhost",))
    r = chat(by_name, video_message(f"http://localhost:{port}/clip.mp4"))
    assert r.status_code == 403 and "127.0.0.1" in error_of(r)["message"] and "loopback" in error_of(r)["message"]
    r = chat(by_name, video_message(f"http://127.0.0.1:{port}/clip.mp4"))
    assert r.status_code == 403 and "not an allowed media domain" in error_of(r)["message"]
    for metadata in ("http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/", "http://[::1]/"):
        r = chat(
            make_client(allowed_media_domains=("169.254.169.254", "::ffff:127.0.0.1", "::1")), video_message(metadata)
        )
        assert r.status_code == 403 and error_of(r)["code"] == "media_url_not_allowed", (metadata, r.text)
    assert seen == []
    # an intranet media server allowed by name and network: fetched; its redirects are checked hop by hop
    lab = make_client(allowed_media_domains=("127.0.0.1",), allowed_media_networks=("127.0.0.1/32",))
    assert chat(lab, video_message(f"http://127.0.0.1:{port}/clip.mp4")).status_code == 200
    for target, says in [
        (f"http://localhost:{port}/clip.mp4", "not an allowed media domain"),
        ("file:///etc/passwd", "redirect to a file: URL"),
    ]:
        seen.clear()
        r = chat(lab, video_message(f"http://127.0.0.1:{port}/go?to={target}"))
        assert r.status_code == 403 and says in error_of(r)["message"], r.text
        assert seen == [f"/go?to={target}"], "only the redirecting hop was fetched"
    lab2 = make_client(allowed_media_domains=("127.0.0.1", "127.0.0.2"), allowed_media_networks=("127.0.0.1/32",))
    r = chat(lab2, video_message(f"http://127.0.0.1:{port}/go?to=http://127.0.0.2:{port}/clip.mp4"))
    assert r.status_code == 403 and "127.0.0.2" in error_of(r)["message"] and "loopback" in error_of(r)["message"]


# ------------------------------------------------------------------------------------------------------------------
# decompression bombs
def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def frames_message(images: list[bytes]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im, "image/png")}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What happens?"}]}]


def test_six_huge_png_frames_are_refused_from_their_headers(make_client):
    bomb = png(8000, 8000)
    assert len(bomb) < 100_000, "a few kilobytes that decode to 64 megapixels"
    client = make_client()
    start = time.monotonic()
    r = chat(client, frames_message([bomb] * 6))
    assert r.status_code == 400 and error_of(r)["code"] == "too_many_pixels", r.text
    assert "8000x8000" in error_of(r)["message"] and error_of(r)["param"].startswith("messages.0.content.0")
    assert time.monotonic() - start < 5, "refused before decoding"


def test_the_pixel_budget_holds_per_request_and_for_videos(make_client, video_dir):
    client = make_client(max_frame_pixels=1000 * 1000, max_request_pixels=2_500_000)
    r = chat(client, frames_message([png(1000, 1000)] * 3))
    assert r.status_code == 400 and "messages.0.content.2" in error_of(r)["param"], r.text
    assert "per request" in error_of(r)["message"]
    small = make_client(max_frame_pixels=32 * 32)  # the synthetic clips are 64x64
    clip = sorted(video_dir.glob("eval_*.mp4"))[0]
    for url in (clip.as_uri(), data_url(clip.read_bytes())):
        r = chat(small, video_message(url))
        assert r.status_code == 400 and error_of(r)["code"] == "too_many_pixels" and "64x64" in error_of(r)["message"]


# ------------------------------------------------------------------------------------------------------------------
# who may call it
def test_an_api_key_guards_every_route_but_health(make_client, video_dir):
    client = make_client(api_key="s3cret-key")
    clip = sorted(video_dir.glob("eval_*.mp4"))[0]
    guarded = [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/merv-tiny"),
        ("GET", "/api/videos"),
        ("GET", f"/api/media?url={clip.as_uri()}"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/api/uploads"),
    ]
    for method, path in guarded:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key", (method, path, headers, r.text)
            assert "s3cret" not in r.text
    key = {"Authorization": "Bearer s3cret-key"}
    assert client.get("/health").status_code == 200
    page = client.get("/")  # the page and its static files are the same for everyone: it asks for the key itself
    assert page.status_code == 200 and client.get("/static/chat.js").status_code == 200
    assert client.get("/v1/models", headers=key).status_code == 200
    assert client.get("/api/videos", headers=key).status_code == 200
    assert chat(client, video_message(clip.as_uri()), headers=key).status_code == 200
    assert "s3cret" not in repr(client.app.state.settings)


def test_serve_options_reach_the_settings(monkeypatch, video_dir):
    from merv.cli import build_parser, serve_settings

    monkeypatch.setenv("MERV_API_KEY", "from-the-environment")
    argv = ["serve", "--model", "m", "--allowed-media-domain", "cdn.example.org", "--allowed-media-network",
            "10.1.0.0/16", "--max-frame-pixels", "1000000", "--host", "0.0.0.0",
            "--allowed-host", "merv.lab"]  # fmt: skip
    settings = serve_settings(build_parser().parse_args(argv))
    assert settings.api_key == "from-the-environment" and "from-the-environment" not in repr(settings)
    assert (settings.allowed_media_domains, settings.allowed_media_networks) == (("cdn.example.org",), ("10.1.0.0/16",))
    assert (settings.max_frame_pixels, settings.max_request_pixels) == (1_000_000, ServeSettings.max_request_pixels)
    assert settings.allowed_hosts == ("merv.lab",)
    assert serve_settings(build_parser().parse_args([*argv, "--api-key", "on-the-line"])).api_key == "on-the-line"
    with pytest.raises(ValueError, match="--allowed-media-network 'ten'"):
        ServeSettings(model="m", allowed_media_domains=("a",), allowed_media_networks=("ten",))


def test_chat_needs_a_json_body_and_cross_site_posts_are_refused(make_client, video_dir):
    """A web page may POST text/plain or multipart forms to any site without asking (no CORS preflight)."""
    client = make_client()
    clip = sorted(video_dir.glob("eval_*.mp4"))[0]
    body = json.dumps({"model": "merv-tiny", "messages": video_message(clip.as_uri()), "max_tokens": 2})
    r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type", r.text
    cross_site = {"Content-Type": "application/json", "Origin": "https://evil.example"}
    r = client.post("/v1/chat/completions", content=body, headers=cross_site)
    assert r.status_code == 403 and error_of(r)["code"] == "cross_origin", r.text
    r = client.post(
        "/api/uploads",
        files={"file": ("a.mp4", clip.read_bytes(), "video/mp4")},
        headers={"Origin": "https://evil.example"},
    )
    assert r.status_code == 403, r.text
    same_site = {"Content-Type": "application/json; charset=utf-8", "Origin": "http://127.0.0.1:8000"}
    assert client.post("/v1/chat/completions", content=body, headers=same_site).status_code == 200


def test_the_host_header_must_be_one_of_ours(make_client):
    """DNS rebinding: evil.example resolves to 127.0.0.1 after the page loaded, and the browser sends its name."""
    local = make_client()
    r = local.get("/v1/models", headers={"Host": "evil.example:8000"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_host", r.text
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
        assert local.get("/v1/models", headers={"Host": host}).status_code == 200, host
    assert local.get("/health", headers={"Host": "evil.example"}).status_code == 400
    with pytest.raises(ValueError, match="--allowed-host"):
        ServeSettings(model="m", host="0.0.0.0")
    public = make_client(host="0.0.0.0", allowed_hosts=("merv.lab.example",))
    assert public.get("/v1/models", headers={"Host": "merv.lab.example:8000"}).status_code == 200
    assert public.get("/v1/models", headers={"Host": "evil.example:8000"}).status_code == 400
    assert public.get("/v1/models", headers={"Host": "127.0.0.1:8000"}).status_code == 200, "this machine's own"


def test_api_media_serves_media_files_only(make_client, video_dir, tmp_path):
    bench = tmp_path / "bench"
    (bench / "videos").mkdir(parents=True)
    (bench / "test_a.json").write_text(json.dumps([{"question_id": "q1", "answer": "the secret answer"}]))
    clip = sorted(video_dir.glob("eval_*.mp4"))[0]
    (bench / "videos" / "v.mp4").write_bytes(clip.read_bytes())
    client = make_client(allowed_dirs=(bench,))
    r = client.get("/api/media", params={"url": (bench / "test_a.json").as_uri()})
    assert r.status_code == 403 and "secret" not in r.text and error_of(r)["code"] == "not_media", r.text
    assert client.get("/api/media", params={"url": (bench / "videos" / "v.mp4").as_uri()}).status_code == 200


# ------------------------------------------------------------------------------------------------------------------
# fuzz: whatever a client sends, the answer is a 4xx, never a 5xx (the real server, on loopback)
def fuzz_bodies(rng: random.Random, n: int) -> list[bytes]:
    valid = {"model": "merv-tiny", "messages": [{"role": "user", "content": "What happens?"}]}
    text = json.dumps(valid)
    bodies = [
        b"",
        b"null",
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        text[:-1].encode() + b', "max_tokens": 1' + b"0" * 5000 + b"}",  # an integer of 5001 digits
        b'{"model": "merv-tiny", "messages": [], "temperature": 1e999}',
        b'{"model": "merv-tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        b'{"model": "merv-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -Infinity}',
        b"\xff\xfe\x00garbage",
        b'{"model": "\xed\xa0\x80"}',
        b'{"model": "merv-tiny", "messages": "\\ud800"}',
        b'{"model": "merv-tiny", "messages": [' + b'{"role": "user", "content": "x"},' * 5000 + b"1]}",
    ]
    wrong_types = [None, 0, -1, 2**63, 1.5, "", "x" * 10_000, [], {}, [[]], True]
    fields = ["model", "messages", "temperature", "top_p", "max_tokens", "stop", "stream", "n", "stream_options"]
    while len(bodies) < n:
        kind = rng.randrange(4)
        if kind == 0:  # a field of the wrong type
            bodies.append(json.dumps({**valid, rng.choice(fields): rng.choice(wrong_types)}).encode())
        elif kind == 1:  # a message or part of the wrong shape
            part = rng.choice([{"type": "video_url"}, {"type": "image_url", "image_url": 5}, {"type": 7}, "x", []])
            message = {"role": rng.choice(["user", "system", 3, None]), "content": [part]}
            bodies.append(json.dumps({**valid, "messages": [message]}).encode())
        elif kind == 2:  # cut short or with a byte changed
            cut = text[: rng.randrange(len(text))]
            bodies.append(cut.encode() if rng.random() < 0.5 else (cut + chr(rng.randrange(0x110000 >> 8))).encode())
        else:  # a media URL no policy allows
            url = rng.choice(["http://127.0.0.1:1/x", "gopher://x", "file:///etc/passwd", "data:,x", "data:;base64,@"])
            bodies.append(json.dumps({**valid, "messages": video_message(url)}).encode())
    return bodies


def test_fuzzed_requests_get_4xx_never_5xx(server):
    rng = random.Random(19)
    bodies = fuzz_bodies(rng, 150)
    deadline = time.monotonic() + 120
    statuses = []
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body in bodies:
            r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            statuses.append(r.status_code)
            assert 400 <= r.status_code < 500, (body[:200], r.status_code, r.text[:300])
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert time.monotonic() < deadline, "the fuzz pass is bounded in time"
        for path in (
            "/api/media?url=" + "%" * 300,
            "/api/media?url=file:%2F%2F%2F..%2F..",
            "/api/media",
            "/v1/models/%00",
            "/api/media?url=file:///tmp/%00x",
            "/api/media?url=http://x/y.mp4",
        ):
            assert 400 <= http.get(path).status_code < 500, path
        garbage = {"Content-Type": "multipart/form-data; boundary=zz", "Content-Length": "3"}
        assert 400 <= http.post("/api/uploads", content=b"x--", headers=garbage).status_code < 500
        assert http.get("/health").json()["status"] == "ok"
    assert len(statuses) == 150
