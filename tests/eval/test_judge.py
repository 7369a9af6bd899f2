"""The judge client against a stand-in judge over real HTTP (tests/eval/judge_server.py), and its parsing."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter

import pytest

from merv.eval.judge import (
    BUILTIN_PROMPT,
    PROMPT_VERSION,
    Judge,
    JudgeConfig,
    JudgeConfigError,
    JudgeUnavailable,
    VerdictError,
    parse_verdict,
    redact_url,
    resolve_judge_config,
)

# (question, answer, prediction) -> the stand-in's verdict: yes/5 on a normalised match, else no/1 or no/0
ITEMS = [
    ("What colour is the moving shape?", "red", "Red."),
    ("What colour is the moving shape?", "blue", "green"),
    ("Which shape is in the video?", "circle", "a circle"),
    ("Which way does the shape move first?", "left", "left"),
    ("Which way does the shape move at the end?", "up", ""),
    ("Which shape is in the video?", "square", "square"),
]
EXPECTED = [("yes", 5), ("no", 0), ("no", 1), ("yes", 5), ("no", 0), ("yes", 5)]


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("{'pred': 'yes', 'score': 4}", {"pred": "yes", "score": 4}),
        ('  {"pred": "No", "score": 0}\n', {"pred": "no", "score": 0}),
        ("```python\n{'pred': 'yes', 'score': 5}\n```", {"pred": "yes", "score": 5}),
        ("{'pred': 'no', 'score': 2.0, 'reason': 'partial'}", {"pred": "no", "score": 2}),
    ],
)
def test_verdicts_parse(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "yes",
        "The answer is correct. {'pred': 'yes', 'score': 5}",
        "{'pred': 'maybe', 'score': 3}",
        "{'pred': 'yes', 'score': 6}",
        "{'pred': 'yes', 'score': 2.5}",
        "{'pred': 'yes', 'score': True}",
        "{'pred': 'yes'}",
        "['yes', 4]",
        "{'pred': 'yes', 'score': 4} {'pred': 'no', 'score': 0}",
        "__import__('os').system('true')",
    ],
)
def test_non_verdicts_are_refused_never_read_as_no(reply):
    with pytest.raises(VerdictError):
        parse_verdict(reply)


def test_config_precedence_flags_env_section():
    section = {"url": "http://config:1/v1", "model": "m-config", "concurrency": 3}
    env = {"MERV_JUDGE_URL": "http://env:2/v1", "MERV_JUDGE_PRESET": "merv-original"}
    cfg = resolve_judge_config({"model": "m-flag"}, env=env, section=section)
    assert (cfg.url, cfg.model, cfg.preset, cfg.concurrency) == ("http://env:2/v1", "m-flag", "merv-original", 3)
    assert resolve_judge_config({}, env={}, section={"model": "m"}) is None, "no URL: no judge"
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_judge_config({}, env={}, section={"url": "http://x/v1", "temprature": 0})
    with pytest.raises(ValueError, match="preset 'gpt' is unknown"):
        JudgeConfig(url="http://x/v1", preset="gpt")
    assert redact_url("https://user:secret@host:8000/v1?key=abc") == "https://host:8000/v1"


def _judge(server, **kw) -> Judge:
    kw = {"backoff_s": 0.01, "timeout_s": 5.0, "concurrency": 3, **kw}
    return Judge(JudgeConfig(url=server.url, **kw))


def _judge_items(judge: Judge, items=ITEMS) -> dict[int, dict]:
    verdicts = {}
    judge.judge_all(
        [(str(i), {"question": q, "answer": a, "prediction": p, "id": i}) for i, (q, a, p) in enumerate(items)],
        lambda key, v: verdicts.__setitem__(int(key), v),
    )
    return verdicts


def test_verdicts_over_http_with_the_protocol_and_presets(start_judge):
    server = start_judge("--model", "judge-7b", "--served-model", "judge-7b-2024-06")
    judge = _judge(server)  # no model named: the one the endpoint serves
    assert judge.model == "judge-7b"
    verdicts = _judge_items(judge)
    assert [(verdicts[i]["pred"], verdicts[i]["score"]) for i in range(len(ITEMS))] == EXPECTED
    assert {v["served_model"] for v in verdicts.values()} == {"judge-7b-2024-06"}
    requests = server.requests()
    assert len(requests) == len(ITEMS) and {r["outcome"] for r in requests} == {"ok"}
    assert {(r["model"], r["temperature"], r["max_tokens"]) for r in requests} == {("judge-7b", 0.0, 64)}
    assert sorted((r["question"], r["answer"], r["prediction"]) for r in requests) == sorted(ITEMS)
    assert "evaluator of question-answer pairs" in requests[0]["system"]
    assert judge.describe() == {
        "url": server.url,
        "model": "judge-7b",
        "served_models": ["judge-7b-2024-06"],
        "prompt_version": PROMPT_VERSION,
        "prompt_sha256": BUILTIN_PROMPT.sha256,
        "prompt_file": None,
        "unparseable": "unjudged",
        "preset": "video-chatgpt",
        "temperature": 0.0,
        "max_tokens": 64,
    }

    merv_like = _judge(server, model="judge-7b", preset="merv-original")
    _judge_items(merv_like, ITEMS[:1])
    assert (server.requests()[-1]["temperature"], server.requests()[-1]["max_tokens"]) == ("absent", 500)


def test_malformed_replies_are_retried_then_counted_unjudged(start_judge):
    server = start_judge("--malformed-first", "1", "--always-malformed", "circle")
    judge = _judge(server, parse_attempts=3)
    verdicts = _judge_items(judge)
    unjudged = [i for i, v in verdicts.items() if "unjudged" in v]
    assert unjudged == [2], "only the always-malformed one"
    assert "unparseable after 3 attempts" in verdicts[2]["unjudged"] and "pred" not in verdicts[2]
    for i, expected in enumerate(EXPECTED):
        if i != 2:
            assert (verdicts[i]["pred"], verdicts[i]["score"]) == expected
    per_pair = Counter(r["key"] for r in server.requests())
    assert sorted(per_pair.values()) == [2] * 5 + [3]  # one malformed + one good; the bad one 3 times
    assert judge.retries == {"unparseable": 5 + 3}


def test_a_reply_that_is_not_a_chat_completion_is_asked_again(start_judge):
    server = start_judge("--garbage-first", "1")  # HTTP 200 with an HTML body, as a misconfigured proxy sends
    judge = _judge(server, model="stand-in-judge")
    verdicts = _judge_items(judge)
    assert [(verdicts[i]["pred"], verdicts[i]["score"]) for i in range(len(ITEMS))] == EXPECTED
    assert judge.retries == {"unparseable": len(ITEMS)}
    assert Counter(r["outcome"] for r in server.requests()) == {"garbage": len(ITEMS), "ok": len(ITEMS)}


def test_http_500_and_timeouts_are_retried_with_nothing_double_counted(start_judge):
    server = start_judge("--error-first", "2", "--sleep-first", "3", "--sleep-s", "1.5")
    judge = _judge(server, timeout_s=0.5, max_attempts=4, concurrency=6)
    verdicts = _judge_items(judge)
    assert [(verdicts[i]["pred"], verdicts[i]["score"]) for i in range(len(ITEMS))] == EXPECTED
    outcomes = Counter((r["key"], r["outcome"]) for r in server.requests())
    keys = {r["key"] for r in server.requests()}
    assert all(outcomes[(k, "500")] == 2 and outcomes[(k, "slept")] == 1 and outcomes[(k, "ok")] == 1 for k in keys)
    assert judge.retries == {"http_500": 12, "timeout": 6}


def test_an_endpoint_that_stays_down_stops_the_run(start_judge):
    server = start_judge("--error-first", "10")
    judge = _judge(server, model="stand-in-judge", max_attempts=3, concurrency=2)
    with pytest.raises(JudgeUnavailable, match="failed 3 times in a row \\(http_500\\)"):
        _judge_items(judge)


def test_api_key_from_env_or_file_is_sent_and_never_logged(start_judge, tmp_path, monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    server = start_judge("--require-key", secret)
    with pytest.raises(JudgeConfigError, match="HTTP 401"):
        _judge(server)  # no key
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    caplog.set_level(logging.DEBUG)
    judge = _judge(server, api_key_env="MY_JUDGE_KEY")
    assert _judge_items(judge, ITEMS[:2])[0]["pred"] == "yes"
    key_file = tmp_path / "key.txt"
    key_file.write_text(secret + "\n")
    judge = _judge(server, api_key_file=str(key_file))
    assert _judge_items(judge, ITEMS[:1])[0]["pred"] == "yes"
    assert secret not in caplog.text and secret not in repr(judge.cfg) and secret not in str(judge.describe())


# ------------------------------------------------------------------------------------------------------------------
# trust: the key never lands in results, a missing key is an error, the endpoint's Retry-After is honoured


def test_a_judge_that_echoes_the_key_never_gets_it_stored(start_judge, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    server = start_judge("--require-key", secret, "--echo-headers-on", "circle")
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    judge = _judge(server, model="stand-in-judge", api_key_env="MY_JUDGE_KEY")
    verdicts = _judge_items(judge)
    assert "http 400" in verdicts[2]["unjudged"], verdicts[2]
    assert [s for s in (secret, secret[3:], secret[:12]) if s in json.dumps(verdicts)] == [], verdicts[2]
    assert "cannot judge this request" in verdicts[2]["unjudged"], "the rest of the reason is kept"


def test_a_missing_key_variable_is_an_error_unless_the_endpoint_is_local(start_judge, tmp_path, monkeypatch):
    monkeypatch.delenv("MERV_TEST_UNSET_KEY", raising=False)
    remote = JudgeConfig(url="https://judge.example.org/v1", model="m", api_key_env="MERV_TEST_UNSET_KEY")
    with pytest.raises(JudgeConfigError, match="MERV_TEST_UNSET_KEY is not set"):
        Judge(remote)  # refused before any request: nothing is sent with a made-up key
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(JudgeConfigError, match="empty.txt is empty"):
        Judge(JudgeConfig(url="https://judge.example.org/v1", model="m", api_key_file=str(tmp_path / "empty.txt")))
    server = start_judge()  # on this machine: a local vLLM or SGLang server usually has no key
    assert _judge_items(_judge(server, api_key_env="MERV_TEST_UNSET_KEY"), ITEMS[:1])[0]["pred"] == "yes"


def test_retries_honour_retry_after(start_judge):
    server = start_judge("--rate-limit-first", "1", "--retry-after", "1")
    judge = _judge(server, model="stand-in-judge", backoff_s=0.01)
    assert _judge_items(judge, ITEMS[:1])[0]["pred"] == "yes"
    first, second = server.requests()
    assert (first["outcome"], second["outcome"]) == ("429", "ok")
    assert second["t"] - first["t"] >= 0.95, "asked again before the Retry-After the endpoint sent"
    assert judge.retries == {"http_429": 1}


# ------------------------------------------------------------------------------------------------------------------
# the protocol as data: the judge's wording from a file, and the original's rule for unparseable replies

ORIGINAL_STYLE = """\
# the shape of Video-ChatGPT's wording (written for this test; the original text is not shipped)
system: |-
  You are an intelligent chatbot designed for evaluating the correctness of generative outputs for
  question-answer pairs.
user: |-
  Please evaluate the following video-based question-answer pair:

  Question: {question}
  Correct Answer: {answer}
  Predicted Answer: {prediction}

  Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5.
  For example, your response should look like this: {'pred': 'yes', 'score': 4.8}.
"""


def test_the_builtin_wording_is_pinned():
    """Changing a word of the built-in prompt changes verdicts: bump PROMPT_VERSION, then this digest."""
    assert BUILTIN_PROMPT.sha256 == "8d54b46371b7099739c2d0ac2f1c3fee2046fca1cd69d7586cb7e8eb5adfc5d0"
    user = BUILTIN_PROMPT.messages("Q?", "A", "P")[1]["content"]
    assert "Question: Q?\nCorrect Answer: A\nPredicted Answer: P\n" in user
    assert user.endswith("for example {'pred': 'yes', 'score': 4}. Write nothing else.")


def test_a_prompt_file_is_sent_keyed_and_recorded(start_judge, tmp_path):
    prompt = tmp_path / "video-chatgpt.yaml"
    prompt.write_text(ORIGINAL_STYLE)
    server = start_judge()
    judge = _judge(server, model="stand-in-judge", prompt_file=str(prompt))
    tricky = ("Which shape is in the video?", "the {prediction} circle", "{answer}")  # filled in one pass
    verdicts = _judge_items(judge, [*ITEMS[:2], tricky])
    assert [(verdicts[i]["pred"], verdicts[i]["score"]) for i in range(2)] == EXPECTED[:2]
    sent = server.requests()
    assert sent[0]["system"].startswith("You are an intelligent chatbot") and "evaluator" not in sent[0]["system"]
    assert ("the {prediction} circle", "{answer}") in [(r["answer"], r["prediction"]) for r in sent]
    digest = judge.prompt.sha256
    described = judge.describe()
    assert (described["prompt_file"], described["prompt_sha256"], described["prompt_version"]) == (
        str(prompt),
        digest,
        None,
    )
    builtin = _judge(server, model="stand-in-judge")
    assert judge.verdict_key_fields() != builtin.verdict_key_fields()
    assert judge.verdict_key_fields()["prompt_version"] == f"file:{digest}"
    prompt.write_text(ORIGINAL_STYLE.replace("an integer value", "a whole number"))  # one word: another key
    assert _judge(server, model="stand-in-judge", prompt_file=str(prompt)).verdict_key_fields() != (
        judge.verdict_key_fields()
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("user: 'Question: {question} Answer: {answer}'", "the user text has no {prediction}"),
        ("system: s\nuser: '{question} {answer} {prediction}'\ntemperature: 0", "unknown keys ['temperature']"),
        ("- a list", "expected a mapping"),
        ("user: [1, 2]", "must be texts"),
        ("user: '{question'\n  bad: [", "not YAML or JSON"),
    ],
)
def test_a_bad_prompt_file_is_refused_naming_it(tmp_path, text, says):
    prompt = tmp_path / "prompt.yaml"
    prompt.write_text(text)
    with pytest.raises(JudgeConfigError, match=re.escape(says)) as info:
        Judge(JudgeConfig(url="http://127.0.0.1:9/v1", model="m", prompt_file=str(prompt)))
    assert str(prompt) in str(info.value)


def test_unparseable_replies_counted_as_no_on_request(start_judge):
    server = start_judge("--always-malformed", "circle")
    ours = _judge(server, model="stand-in-judge", parse_attempts=1)
    original = _judge(server, model="stand-in-judge", parse_attempts=1, unparseable="no")
    assert "unjudged" in _judge_items(ours)[2]
    verdict = _judge_items(original)[2]
    assert (verdict["pred"], verdict["score"]) == ("no", 0) and "unparseable" in verdict["counted_as_no"]
    assert original.describe()["unparseable"] == "no"
    assert original.verdict_key_fields() == {**ours.verdict_key_fields(), "unparseable": "no"}
    with pytest.raises(ValueError, match="unparseable must be one of"):
        JudgeConfig(url="http://x/v1", unparseable="zero")


def test_prompt_file_and_unparseable_come_from_flags_env_or_config(tmp_path):
    env = {"MERV_JUDGE_PROMPT_FILE": "/env/prompt.yaml", "MERV_JUDGE_UNPARSEABLE": "no"}
    cfg = resolve_judge_config({"url": "http://x/v1"}, env=env, section={"prompt_file": "/config/prompt.yaml"})
    assert (cfg.prompt_file, cfg.unparseable) == ("/env/prompt.yaml", "no")
    cfg = resolve_judge_config({"url": "http://x/v1", "unparseable": "unjudged"}, env=env)
    assert cfg.unparseable == "unjudged"
