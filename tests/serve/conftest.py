"""``merv serve`` as users run it: a real subprocess on a free localhost port, serving a checkpoint of the tiny model
that was taught (in a few dozen steps) to answer every question with one legible sentence, so answers can be read
back from the chat page's screenshot."""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.overfit import fit

ANSWER = "The red circle moves to the left."
QUESTIONS = ["What happens in the video?", "Describe the video.", "What colour is the moving shape?"]


def fit_answer(model, videos: list[Path], steps: int = 60) -> float:
    """Teach ``model`` (projectors, fusion, LLM) to answer any of QUESTIONS about any of ``videos`` with ANSWER."""
    from merv.data.video import read_frames
    from merv.prompting import conversation_to_ids

    counts = [e.num_frames for e in model.encoders.values()]
    size = max(e.image_size for e in model.encoders.values())
    examples = []
    for i, video in enumerate(videos):
        frames, positions = read_frames(video, counts, size)
        per_encoder = {n: frames[positions[e.num_frames]] for n, e in model.encoders.items()}
        turns = [{"from": "human", "value": QUESTIONS[i % len(QUESTIONS)]}, {"from": "gpt", "value": ANSWER}]
        ids, labels = conversation_to_ids(model.tokenizer, turns, model.cfg.llm.prompt_format)
        examples.append({"videos": model.transform(per_encoder), "input_ids": ids, "labels": labels})
    return fit(model, examples, steps)


@pytest.fixture(scope="session")
def video_dir(synth_dir, tmp_path_factory) -> Path:
    """The folder the server may read: a few synthetic clips and one file that is not a video."""
    out = tmp_path_factory.mktemp("served") / "videos"
    out.mkdir()
    for video in sorted((synth_dir / "eval_data" / "synth_open" / "videos").glob("*.mp4"))[:3]:
        shutil.copy(video, out / video.name)
    (out / "broken.mp4").write_bytes(b"this is not a video " * 100)
    return out


@pytest.fixture(scope="session")
def serve_checkpoint(tiny_run, synth_dir, tmp_path_factory) -> Path:
    from merv.checkpoint import save_checkpoint
    from merv.config import fingerprint
    from merv.models.merv import MERV

    torch.manual_seed(0)
    model = MERV.from_config(tiny_run.model)
    videos = sorted((synth_dir / "train" / "videos").glob("*.mp4"))[:6]
    loss = fit_answer(model, videos)
    assert loss < 0.05, f"the tiny model did not learn its answer (loss {loss:.3f})"
    out = tmp_path_factory.mktemp("ckpt") / "finetune"
    meta = {
        "stage": "finetune",
        "step": 60,
        "trained_groups": ["fusion", "llm", "projectors"],
        "seed": 0,
        "init": None,
        "config_fingerprint": fingerprint([tiny_run.to_dict(), "tests/serve"]),
        "final_loss": loss,
    }
    save_checkpoint(model, tiny_run, out, meta)
    return out


def start_server(checkpoint: Path, log: Path, *args) -> tuple[subprocess.Popen, str]:
    """``merv serve --port 0 ...`` in a subprocess; returns it and its base URL once ``/health`` answers."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "merv.cli", "serve", "--model", str(checkpoint), "--port", "0", "--device", "cpu"]
    out = log.open("w")
    proc = subprocess.Popen([*cmd, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"merv serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        lines = [ln for ln in log.read_text().splitlines() if "listening on http://" in ln]
        if lines:
            url = lines[0].split("listening on ")[1].strip()
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if json.load(r)["status"] == "ok":
                        return proc, url
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"merv serve did not come up in time:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM, as a service manager would: uvicorn shuts down gracefully, then exits by that signal."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert "Application shutdown complete" in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="session")
def server(serve_checkpoint, video_dir, tmp_path_factory):
    """The running server: ``.url``, ``.log`` (its output), ``.model`` (the served name)."""
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    proc, url = start_server(
        serve_checkpoint,
        log,
        "--allowed-dir",
        video_dir,
        "--max-upload-mb",
        1,
        "--max-batch",
        8,
        "--batch-wait-ms",
        100,
        "--download-timeout",
        10,
        # the tests' web server is on loopback: allowed by name and network, as an intranet media server would be
        "--allowed-media-domain",
        "127.0.0.1",
        "--allowed-media-network",
        "127.0.0.1/32",
    )
    yield SimpleNamespace(url=url, log=log, model="merv-tiny", proc=proc)
    stop_server(proc, log)


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def clip(video_dir):
    return sorted(video_dir.glob("eval_*.mp4"))[0]


@pytest.fixture(scope="session")
def tokenizer(tiny_run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_run.model.llm.weights)


@pytest.fixture(scope="session")
def web(tmp_path_factory, clip):
    """A plain HTTP file server (another host, as far as merv serve knows): a clip and a file over the limit."""
    root = tmp_path_factory.mktemp("web")
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    (root / "huge.mp4").write_bytes(np.random.default_rng(0).bytes(1_300_000))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def video_message(url: str, question: str = QUESTIONS[0]) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def ask(client, messages, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 24} | kwargs
    return client.chat.completions.create(model="merv-tiny", messages=messages, **kwargs)


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()
