"""``merv serve`` throughput with and without batching (issue 14): the same load against ``--max-batch 1`` and
``--max-batch N``, non-streaming and streaming, printed as ratios measured in one run.

    python benchmarks/serve_batching.py                       # CPU: an untrained merv-tiny checkpoint
    python benchmarks/serve_batching.py --device cuda         # the same on a GPU
    python benchmarks/serve_batching.py --model results/merv_tiny/finetune --video clip.mp4

Load: ``--clients`` concurrent clients, each sending ``--requests`` requests one after the other (greedy,
``max_tokens`` fixed; an untrained model rarely stops early, so answers are about that long). Reported per setting:
requests/s, completion tokens/s, mean latency and, for streaming, mean time to the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def build_checkpoint(tmp: Path) -> Path:
    """merv-tiny with random weights, saved as a checkpoint folder (what ``merv serve`` loads)."""
    import torch

    from merv.checkpoint import save_checkpoint
    from merv.config import resolve_run_config
    from merv.data.synth import tokenizer_corpus
    from merv.models.merv import MERV
    from merv.models.tiny import build_tiny_weights

    overrides = {
        "model": {
            "encoders": {"vit": {"weights": str(tmp / "vit.safetensors")}, "vivit": {"weights": str(tmp / "vivit")}},
            "llm": {"weights": str(tmp / "llm")},
        }
    }
    run = resolve_run_config("merv-tiny", overrides)
    build_tiny_weights(run, tokenizer_corpus())
    torch.manual_seed(0)
    out = tmp / "ckpt"
    save_checkpoint(MERV.from_config(run.model), run, out, {"trained_groups": ["projectors", "fusion"]})
    return out


def start(model: Path, video_dir: Path, device: str, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "merv.cli", "serve", "--model", str(model), "--port", "0", "--device", device]
    cmd += ["--allowed-dir", str(video_dir), "--max-batch", str(max_batch), "--batch-wait-ms", "5"]
    proc = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        for line in log.read_text().splitlines():
            if "listening on " in line:
                url = line.split("listening on ")[1].strip()
                try:
                    httpx.get(url + "/health").raise_for_status()
                    return proc, url
                except httpx.HTTPError:
                    pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("merv serve did not start")


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float | None, int]:
    """(latency, time to first token or None, completion tokens) of one request."""
    start = time.perf_counter()
    if not body["stream"]:
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - start, None, r.json()["usage"]["completion_tokens"]
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - start
    return time.perf_counter() - start, first, tokens


async def load(url: str, video: Path, stream: bool, clients: int, requests: int, max_tokens: int) -> dict:
    body = {
        "model": httpx.get(url + "/v1/models").json()["data"][0]["id"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": video.as_uri()}},
                    {"type": "text", "text": "What happens in the video?"},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, url, body)  # warm-up

        async def worker():
            return [await one(client, url, body) for _ in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    firsts = [f for _, f, _ in results if f is not None]
    return {
        "req_per_s": len(results) / wall,
        "tok_per_s": sum(t for _, _, t in results) / wall,
        "latency_s": sum(lat for lat, _, _ in results) / len(results),
        "first_token_s": sum(firsts) / len(firsts) if firsts else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder (default: an untrained merv-tiny built here)")
    p.add_argument("--video", help="video to ask about (default: a synthetic clip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="per client")
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = Path(args.model) if args.model else build_checkpoint(tmp)
        if args.video:
            video = Path(args.video).resolve()
        else:
            from merv.data.synth import write_dataset

            write_dataset(tmp / "synth", seed=0, train_videos=1, eval_videos=1)
            video = next((tmp / "synth" / "eval_data").rglob("*.mp4")).resolve()
        rows = {}
        for max_batch in (1, args.max_batch):
            proc, url = start(model, video.parent, args.device, max_batch, tmp / f"serve-{max_batch}.log")
            try:
                for stream in (False, True):
                    r = asyncio.run(load(url, video, stream, args.clients, args.requests, args.max_tokens))
                    rows[(max_batch, stream)] = r
                health = httpx.get(url + "/health").json()
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            print(f"--max-batch {max_batch}: batch sizes {health['batch_sizes']}, device {health['device']}")

    print(f"\n{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, device {args.device}")
    print(f"{'max_batch':>9} {'stream':>6} {'req/s':>7} {'tok/s':>8} {'latency s':>9} {'1st token s':>11}")
    for (max_batch, stream), r in rows.items():
        first = f"{r['first_token_s']:.3f}" if r["first_token_s"] is not None else "-"
        print(
            f"{max_batch:>9} {str(stream):>6} {r['req_per_s']:>7.2f} {r['tok_per_s']:>8.1f} "
            f"{r['latency_s']:>9.3f} {first:>11}"
        )
    for stream in (False, True):
        batched, single = rows[(args.max_batch, stream)], rows[(1, stream)]
        speedup = batched["tok_per_s"] / single["tok_per_s"]
        latency = batched["latency_s"] / single["latency_s"]
        kind = "streaming" if stream else "non-streaming"
        print(f"{kind}: batched / one-by-one: throughput {speedup:.2f}x, mean latency {latency:.2f}x")


if __name__ == "__main__":
    main()
