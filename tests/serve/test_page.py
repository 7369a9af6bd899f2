"""The chat page and its helper routes: plain HTTP for the routes, headless Chromium for the page itself."""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import ANSWER, QUESTIONS, ask, video_message


def test_page_and_video_routes(server, video_dir, synth_dir):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'src="/static/chat.js"' in page.text
    assert httpx.get(server.url + "/static/chat.js").status_code == 200
    listing = httpx.get(server.url + "/api/videos").json()
    assert listing["model"] == "merv-tiny"
    names = {v["name"] for v in listing["videos"]}
    assert {f"videos/{p.name}" for p in video_dir.glob("*.mp4")} <= names
    clip = sorted(video_dir.glob("eval_*.mp4"))[0]
    media = httpx.get(server.url + "/api/media", params={"url": clip.as_uri()})
    assert media.status_code == 200 and media.content == clip.read_bytes()
    assert media.headers["content-type"] == "video/mp4"
    outside = sorted((synth_dir / "train" / "videos").glob("*.mp4"))[0]
    refused = httpx.get(server.url + "/api/media", params={"url": outside.as_uri()})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "path_not_allowed"


def test_uploads(server, client, video_dir):
    clip = sorted(video_dir.glob("eval_*.mp4"))[1]

    def upload(name: str, data: bytes) -> httpx.Response:
        return httpx.post(server.url + "/api/uploads", files={"file": (name, data, "video/mp4")})

    r = upload("my clip.mp4", clip.read_bytes())
    assert r.status_code == 200, r.text
    stored = r.json()
    assert re.fullmatch(r"uploads/[0-9a-f]{8}-my_clip\.mp4", stored["name"]) and stored["bytes"] == clip.stat().st_size
    assert stored["name"] in {v["name"] for v in httpx.get(server.url + "/api/videos").json()["videos"]}
    assert ask(client, video_message(stored["url"])).choices[0].message.content == ANSWER
    for name, data, status, says in [
        ("notes.txt", b"hello", 400, "is not a video file name"),
        ("fake.mp4", b"hello" * 100, 400, "not a decodable video"),
        ("big.mp4", np.random.default_rng(0).bytes(1_100_000), 413, "over the upload limit"),
    ]:
        r = upload(name, data)
        assert r.status_code == status and says in r.json()["error"]["message"], r.text


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def ocr(png) -> str:
    return subprocess.run(["tesseract", str(png), "-", "--psm", "6"], capture_output=True, text=True, check=True).stdout


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, words(a), words(b)).ratio()


@pytest.mark.slow
def test_chat_page_in_chromium(server, client, video_dir, tmp_path):
    """Choose a synthetic clip, ask, read the streamed answer (DOM and screenshot), follow up, then upload a clip."""
    from tests.serve.browser import CHROMIUM, Browser

    if CHROMIUM is None or shutil.which("tesseract") is None:
        pytest.fail("the chat page test needs Debian's chromium and tesseract-ocr: run `make browser-packages`")

    clip = sorted(video_dir.glob("eval_*.mp4"))[2]
    expected = ask(client, video_message(clip.as_uri(), QUESTIONS[0]), max_tokens=128).choices[0].message.content
    assert expected == ANSWER
    browser = Browser(tmp_path / "chromium")
    try:
        browser.goto(server.url + "/")
        browser.wait_for("document.querySelectorAll('#video-select option').length > 3")
        before = browser.screenshot(tmp_path / "before.png", "#chat-pane", scale=2)
        browser.evaluate(
            f"(() => {{ const s = document.getElementById('video-select'); s.value = '{clip.as_uri()}';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        assert browser.wait_for("document.getElementById('player').readyState >= 1 && player.duration") > 0
        browser.click("#question")
        browser.type(QUESTIONS[0])
        browser.click("#send")
        browser.wait_for("!!document.querySelector('.msg.assistant[data-done=\"true\"]')")
        answer = browser.evaluate("document.querySelector('.msg.assistant').textContent")
        assert answer == expected
        # the screenshot shows the answer: OCR of the answer bubble reads the same words, and not before it was there
        bubble = browser.screenshot(tmp_path / "answer.png", ".msg.assistant", scale=3)
        page = browser.screenshot(tmp_path / "page.png")
        read = ocr(bubble)
        assert similarity(read, answer) > 0.9, (read, answer)
        assert similarity(ocr(before), answer) < 0.5
        pixels = np.asarray(Image.open(page).convert("RGB"))
        assert pixels.shape == (800, 1280, 3) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100

        browser.click("#question")  # a follow-up: the page sends the history, the server answers it
        browser.type(QUESTIONS[2])
        browser.press_enter()
        browser.wait_for("document.querySelectorAll('.msg.assistant[data-done=\"true\"]').length === 2")
        assert browser.evaluate("window.chat.messages.length") == 4
        history = [
            *video_message(clip.as_uri(), QUESTIONS[0]),
            {"role": "assistant", "content": answer},
            {"role": "user", "content": QUESTIONS[2]},
        ]
        follow_up = ask(client, history, max_tokens=128).choices[0].message.content
        assert browser.evaluate("document.querySelectorAll('.msg.assistant')[1].textContent") == follow_up

        upload = tmp_path / "my upload.mp4"  # a video from the user's disk: uploaded, selected, asked about
        shutil.copy(sorted(video_dir.glob("eval_*.mp4"))[0], upload)
        browser.set_files("#video-upload", [upload])
        browser.wait_for(
            "document.getElementById('video-select').selectedOptions[0].textContent.startsWith('uploads/')"
        )
        assert browser.evaluate("document.querySelectorAll('.msg').length") == 0  # a new video starts a new chat
        browser.click("#question")
        browser.type(QUESTIONS[1])
        browser.click("#send")
        browser.wait_for("!!document.querySelector('.msg.assistant[data-done=\"true\"]')")
        assert browser.evaluate("document.querySelector('.msg.assistant').textContent") == ANSWER
    finally:
        browser.close()


@pytest.mark.slow
def test_chat_page_with_an_api_key_in_chromium(serve_checkpoint, video_dir, tmp_path, monkeypatch):
    """A server started with MERV_API_KEY: the page asks for the key, then lists, plays and asks as before."""
    from tests.serve.browser import CHROMIUM, Browser
    from tests.serve.conftest import start_server, stop_server

    if CHROMIUM is None:
        pytest.fail("the chat page test needs Debian's chromium: run `make browser-packages`")
    key = "page-key-0123456789"
    monkeypatch.setenv("MERV_API_KEY", key)  # from the environment: not on the command line
    log = tmp_path / "serve.log"
    proc, url = start_server(serve_checkpoint, log, "--allowed-dir", video_dir)
    browser = Browser(tmp_path / "chromium")
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        browser.goto(url + "/")
        browser.wait_for("!document.getElementById('key-form').hidden")
        assert browser.evaluate("document.querySelectorAll('#video-select option').length") == 1
        browser.click("#api-key")
        browser.type(key)
        browser.click("#key-form button")
        browser.wait_for("document.querySelectorAll('#video-select option').length > 3")
        clip = sorted(video_dir.glob("eval_*.mp4"))[0]
        browser.evaluate(
            f"(() => {{ const s = document.getElementById('video-select'); s.value = '{clip.as_uri()}';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        assert browser.wait_for("document.getElementById('player').readyState >= 1 && player.duration") > 0
        browser.click("#question")
        browser.type(QUESTIONS[0])
        browser.click("#send")
        browser.wait_for("!!document.querySelector('.msg.assistant[data-done=\"true\"]')")
        assert browser.evaluate("document.querySelector('.msg.assistant').textContent") == ANSWER
    finally:
        browser.close()
        stop_server(proc, log)
    assert key not in log.read_text(), "the key is never logged"
