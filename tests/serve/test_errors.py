"""Bad requests get a 4xx error in OpenAI's shape, naming the item and the reason; the server keeps serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.serve.conftest import ANSWER, ask, data_url, video_message


def expect_error(call, status: int, code: str, says: str) -> dict:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value.body
    assert info.value.status_code == status, error
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["code"] == code and says in error["message"], error
    return error


def test_each_bad_request_is_refused_and_the_server_keeps_serving(client, server, clip, video_dir, synth_dir, web):
    outside = sorted((synth_dir / "train" / "videos").glob("*.mp4"))[0]  # a real video, outside the allowed folder
    cases = [
        ([{"role": "user", "content": "What happens?"}], 400, "no_video", "no video"),
        (
            video_message((video_dir / "broken.mp4").as_uri()),
            400,
            "invalid_video",
            "broken.mp4): not a decodable video",
        ),
        (video_message((video_dir / "missing.mp4").as_uri()), 400, "invalid_video", "file not found"),
        (video_message(outside.as_uri()), 403, "path_not_allowed", "is outside the allowed folders"),
        (
            video_message(f"file://{video_dir}/../../{outside.relative_to(outside.parents[3])}"),
            403,
            "path_not_allowed",
            "outside",
        ),
        (
            video_message(data_url(np.random.default_rng(0).bytes(1_200_000))),
            413,
            "upload_too_large",
            "over the upload limit",
        ),
        (video_message(data_url(b"\x00garbage" * 100)), 400, "invalid_video", "not a decodable video"),
        (video_message("data:video/mp4;base64,@@@@"), 400, "invalid_url", "not valid base64"),
        (video_message(web + "/nothing.mp4"), 400, "download_failed", "HTTP 404"),
        (video_message(web + "/huge.mp4"), 413, "upload_too_large", "over the upload limit"),
        (video_message("ftp://example.org/a.mp4"), 400, "invalid_url", "unsupported URL scheme 'ftp'"),
    ]

    def refused(case) -> dict:
        messages, status, code, says = case
        return expect_error(lambda: ask(client, messages), status, code, says)

    def answered(_) -> str:
        return ask(client, video_message(clip.as_uri())).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:  # good requests in flight among the bad ones
        good = pool.map(answered, range(4))
        errors = list(pool.map(refused, cases))
        assert list(good) == [ANSWER] * 4
    assert all(error["param"] is not None for error in errors), errors
    expect_error(
        lambda: client.chat.completions.create(model="gpt-4o", messages=video_message(clip.as_uri())),
        404,
        "model_not_found",
        "'gpt-4o' is not served here",
    )
    # the same refusals for streaming requests: the status comes before any event
    expect_error(lambda: ask(client, video_message(outside.as_uri()), stream=True), 403, "path_not_allowed", "outside")
    assert ask(client, video_message(clip.as_uri())).choices[0].message.content == ANSWER
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b"{not json", "invalid_json", "not JSON"),
        (b'{"model": "merv-tiny"}', "invalid_request", "messages: Field required"),
        (b'{"model": "merv-tiny", "messages": []}', "invalid_request", "messages: List should have at least 1 item"),
        (
            b'{"model": "merv-tiny", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}',
            "invalid_request",
            "messages.0.content.0: Input tag 'input_audio'",
        ),
        (b'{"model": "merv-tiny", "messages": [{"role": "tool", "content": "x"}]}', "invalid_request", "role"),
        (b'{"model": "merv-tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}', "invalid_request", "n:"),
        (
            b'{"model": "merv-tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}',
            "invalid_request",
            "temperature",
        ),
        (
            b'{"model": "merv-tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}',
            "invalid_request",
            "at most 4",
        ),
        (b"[1, 2]", "invalid_request", "valid dictionary"),
    ],
)
def test_malformed_bodies(server, body, code, says):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and says in error["message"], error


def test_conversation_errors(client, clip):
    video = video_message(clip.as_uri())
    assistant_last = [*video, {"role": "assistant", "content": ANSWER}]
    expect_error(lambda: ask(client, assistant_last), 400, "invalid_request", "the last message must be a user message")
    two_users = [*video, {"role": "user", "content": "and?"}]
    expect_error(lambda: ask(client, two_users), 400, "invalid_request", "turns must alternate")
    two_videos = [*video, {"role": "assistant", "content": ANSWER}, *video]
    expect_error(lambda: ask(client, two_videos), 400, "too_many_videos", "messages.0 and messages.2")
    expect_error(lambda: ask(client, video, max_tokens=10_000), 400, "context_length_exceeded", "context of 256")


def test_oversized_raw_body_and_unknown_route(server):
    big = b'{"model": "merv-tiny", "pad": "' + b"x" * 3_000_000 + b'"}'
    r = httpx.post(server.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
