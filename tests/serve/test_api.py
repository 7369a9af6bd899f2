"""``merv serve`` through the official ``openai`` client and plain HTTP: real requests to a real subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.serve.conftest import ANSWER, QUESTIONS, ask, data_url, health, video_message


# ------------------------------------------------------------------------------------------------------------------
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["merv-tiny"]
    assert client.models.retrieve("merv-tiny").owned_by == "merv"
    h = health(server)
    assert h["status"] == "ok" and h["model"] == "merv-tiny" and h["device"] == "cpu" and h["dtype"] == "float32"


def test_answers_a_file_video_with_usage(client, clip, tokenizer, tiny_run):
    from merv.prompting import PromptBuilder, prompt_to_ids

    reply = ask(client, video_message(clip.as_uri()))
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop" and reply.model == "merv-tiny"
    builder = PromptBuilder(tiny_run.model.llm.prompt_format, tokenizer)
    builder.add_turn("human", QUESTIONS[0])
    prompt = len(prompt_to_ids(tokenizer, builder.get_prompt())) + tiny_run.model.visual_tokens
    answer = len(tokenizer(" " + ANSWER, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, answer)
    assert reply.usage.total_tokens == prompt + answer


def test_answers_base64_http_and_frame_list_videos(client, clip, web):
    from merv.data.video import read_frames

    assert ask(client, video_message(data_url(clip.read_bytes()))).choices[0].message.content == ANSWER
    assert ask(client, video_message(web + "/clip.mp4")).choices[0].message.content == ANSWER
    frames, _ = read_frames(clip, [12], 48)  # as lmms-eval's OpenAI client sends a video: base64 JPEG frames
    parts = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG")
        parts.append({"type": "image_url", "image_url": {"url": data_url(buf.getvalue(), "image/jpeg")}})
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTIONS[1]}]}]
    assert ask(client, messages).choices[0].message.content == ANSWER


def test_streams_tokens(client, clip):
    chunks = list(
        ask(client, video_message(clip.as_uri()), stream=True, stream_options={"include_usage": True}, max_tokens=24)
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == ANSWER
    assert len(deltas) >= 5, deltas  # token by token, not one piece at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(deltas)


def test_streams_raw_sse_ending_with_done(server, clip):
    body = {"model": "merv-tiny", "messages": video_message(clip.as_uri()), "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]) == ANSWER


def test_sampling_settings_are_honoured(client, clip):
    messages = video_message(clip.as_uri())
    short = ask(client, messages, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert ANSWER.startswith(short.choices[0].message.content)
    stopped = ask(client, messages, stop=["circle", "nothing"])
    assert stopped.choices[0].message.content == "The red" and stopped.choices[0].finish_reason == "stop"
    streamed = ask(client, messages, stop="moves", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "The red circle"
    # temperature 2 flattens the learnt distribution: samples stray; top_p 0.01 keeps only the top token
    with ThreadPoolExecutor(4) as pool:
        hot = list(pool.map(lambda _: ask(client, messages, temperature=2.0).choices[0].message.content, range(4)))
    assert any(text != ANSWER for text in hot), hot
    assert ask(client, messages, temperature=2.0, top_p=0.01).choices[0].message.content == ANSWER


def test_multi_turn_history(client, clip, tokenizer, tiny_run):
    from merv.prompting import conversation_to_ids

    messages = [
        {
            "role": "system",
            "content": "Ignored: the prompt format carries the system prompt the model was trained with.",
        },
        *video_message(clip.as_uri(), QUESTIONS[0]),
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": QUESTIONS[2]},
    ]
    reply = ask(client, messages)
    assert reply.choices[0].message.content == ANSWER
    # the prompt is what training puts before the last answer: count the tokens up to that answer's first target
    turns = [QUESTIONS[0], ANSWER, QUESTIONS[2], ANSWER]
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(turns)]
    _, labels = conversation_to_ids(tokenizer, conv, tiny_run.model.llm.prompt_format)
    last_answer = max(i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100)
    assert reply.usage.prompt_tokens == last_answer + tiny_run.model.visual_tokens


def test_concurrent_requests_are_batched(client, server, clip, video_dir):
    """Requests arriving together (streaming or not, different lengths) share generate calls and all get answers."""
    before = health(server)
    clips = sorted(video_dir.glob("eval_*.mp4"))

    def one(i: int) -> tuple[str, str]:
        messages = video_message(clips[i % len(clips)].as_uri(), QUESTIONS[i % 3])
        if i % 3 == 2:
            stream = ask(client, messages, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices), "stream"
        reply = ask(client, messages, max_tokens=3 if i == 1 else 24)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    short, reason = results.pop(1)  # its row stopped at 3 tokens while the others went on
    assert reason == "length" and short and ANSWER.startswith(short)
    assert results == [(ANSWER, "stop"), (ANSWER, "stream"), (ANSWER, "stop"), (ANSWER, "stop"), (ANSWER, "stream")]
    after = health(server)
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6 and after["largest_batch"] >= 2, after


def test_serve_command_errors(tmp_path):
    from merv.serve.settings import ServeSettings

    cmd = [sys.executable, "-m", "merv.cli", "serve", "--port", "0", "--model", str(tmp_path / "nothing")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "nothing: not a merv checkpoint folder" in res.stderr, res.stderr[-2000:]
    with pytest.raises(ValueError, match="nope: not a folder"):
        ServeSettings(model=str(tmp_path), allowed_dirs=(tmp_path / "nope",))
    with pytest.raises(ValueError, match="--max-batch must be >= 1"):
        ServeSettings(model=str(tmp_path), max_batch=0)
