"""LLM judge for open-ended answers: the Video-ChatGPT protocol over the OpenAI chat-completions API.

The judge sees the question, the reference answer and the prediction, and replies with a Python-dict string
``{'pred': 'yes' | 'no', 'score': 0..5}``. Any OpenAI-compatible endpoint works: a local vLLM or SGLang server with an
open-weights model (recommended: its answers do not drift), or a hosted API with a key taken from an environment
variable or a file (never logged, never written anywhere).

Robustness: bounded concurrency (a thread pool), a timeout per request, retries with exponential backoff and jitter
on timeouts, connection errors, HTTP 408/409/429/5xx; a reply that does not parse is asked again, then counted as
*unjudged* with the reason -- never turned into "no". When the endpoint stays unreachable the run stops with
:class:`JudgeUnavailable` after saving every verdict it got; the next run resumes from the cache.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import random
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

# Written from the protocol's description (Video-ChatGPT's QA evaluation as MERV and lmms-eval use it). Changing a
# word of these templates changes the verdicts: bump PROMPT_VERSION, which is part of every verdict's cache key.
PROMPT_VERSION = "video-chatgpt-qa/merv-1"
SYSTEM_PROMPT = (
    "You are an evaluator of question-answer pairs about videos. Given a question, its correct answer and a "
    "predicted answer, you decide whether the predicted answer is correct.\n"
    "INSTRUCTIONS:\n"
    "- Judge whether the predicted answer matches the meaning of the correct answer; the wording does not matter.\n"
    "- Synonyms, paraphrases and equivalent phrasings count as a match.\n"
    "- Decide whether the predicted answer is correct, and rate how well its meaning matches the correct answer."
)
USER_PROMPT = (
    "Evaluate this question-answer pair about a video:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Give a verdict, yes or no, and an integer score from 0 to 5, where 5 is the closest match in meaning. Reply only "
    "with a Python dictionary string whose key 'pred' holds 'yes' or 'no' and whose key 'score' holds the integer, "
    "for example {{'pred': 'yes', 'score': 4}}. Write nothing else."
)
MAX_REPLY_CHARS = 2000  # a verdict is ~30 characters; anything this long is not one


@dataclass(frozen=True)
class JudgePreset:
    """Sampling settings sent with the prompt (``temperature=None``: the field is not sent at all)."""

    name: str
    temperature: float | None
    max_tokens: int
    description: str


PRESETS = {
    "video-chatgpt": JudgePreset("video-chatgpt", 0.0, 64, "ours: temperature 0 (reproducible), 64 tokens"),
    "merv-original": JudgePreset("merv-original", None, 500, "MERV's settings: max_tokens=500, no temperature"),
}


class JudgeUnavailable(RuntimeError):
    """The endpoint kept failing (timeouts, refused connections, 5xx) after every retry."""


class JudgeConfigError(ValueError):
    """The endpoint rejects us as configured (HTTP 401/403/404: key, model name or URL is wrong)."""


class VerdictError(ValueError):
    """A judge reply that is not a verdict."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how it is asked. The API key itself is never part of this object."""

    url: str
    model: str | None = None  # None: the one model the endpoint serves (GET /models)
    preset: str = "video-chatgpt"
    api_key_env: str = "MERV_JUDGE_API_KEY"  # name of the environment variable holding the key (if any)
    api_key_file: str | None = None  # or a file holding it
    concurrency: int = 8
    timeout_s: float = 60.0
    max_attempts: int = 5  # per request, for transport errors
    parse_attempts: int = 3  # per question, for replies that do not parse
    backoff_s: float = 1.0  # first retry delay; doubles each time (with jitter), at most 30 s

    def __post_init__(self):
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"judge url {redact_url(self.url)!r} must start with http:// or https://")
        if self.preset not in PRESETS:
            raise ValueError(f"judge preset {self.preset!r} is unknown; presets: {sorted(PRESETS)}")
        for name in ("concurrency", "max_attempts", "parse_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"judge {name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError(f"judge timeout_s must be > 0 and backoff_s >= 0, got {self.timeout_s}, {self.backoff_s}")

    def api_key(self) -> str | None:
        """The key from ``api_key_file`` or the ``api_key_env`` variable; None for endpoints without one."""
        if self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            if not path.is_file():
                raise JudgeConfigError(f"judge api_key_file {path} does not exist")
            return path.read_text().strip() or None
        return os.environ.get(self.api_key_env) or None


ENV_KEYS = {"url": "MERV_JUDGE_URL", "model": "MERV_JUDGE_MODEL", "preset": "MERV_JUDGE_PRESET",
            "api_key_file": "MERV_JUDGE_API_KEY_FILE"}  # fmt: skip


def resolve_judge_config(
    flags: Mapping[str, object], env: Mapping[str, str] | None = None, section: Mapping[str, object] | None = None
) -> JudgeConfig | None:
    """Per setting: a command-line flag, else ``MERV_JUDGE_*`` environment variable, else the pipeline config's
    ``eval.judge`` section. No URL anywhere: no judge (None)."""
    env = os.environ if env is None else env
    section = dict(section or {})
    unknown = set(section) - {f.name for f in fields(JudgeConfig)}
    if unknown:
        raise ValueError(f"eval.judge has unknown keys {sorted(unknown)}")
    values = {}
    for f in fields(JudgeConfig):
        value = flags.get(f.name)
        if value is None and f.name in ENV_KEYS:
            value = env.get(ENV_KEYS[f.name]) or None
        if value is None:
            value = section.get(f.name)
        if value is not None:
            values[f.name] = value
    if not values.get("url"):
        return None
    return JudgeConfig(**values)


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment (they may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def judge_messages(question: str, answer: str, prediction: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer, prediction=prediction)},
    ]


def parse_verdict(text: str | None) -> dict:
    """A reply -> ``{"pred": "yes"|"no", "score": int 0..5}``, or :class:`VerdictError` saying why not.

    Strict: the reply must be a single dict literal (optionally inside one Markdown code fence) with 'pred' exactly
    yes/no (any case) and 'score' an integer 0-5 (an integral float such as 4.0 is taken as 4). Other keys are ignored.
    """
    if text is None:
        raise VerdictError("empty reply (no content)")
    body = text.strip()
    if len(body) > MAX_REPLY_CHARS:
        raise VerdictError(f"reply of {len(body)} characters is not a verdict")
    fence = re.fullmatch(r"```(?:python|json|py)?\s*(.*?)\s*```", body, re.S)
    if fence:
        body = fence.group(1)
    try:
        value = ast.literal_eval(body)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise VerdictError(f"not a Python dict literal: {text[:80]!r}") from None
    if not isinstance(value, dict) or "pred" not in value or "score" not in value:
        raise VerdictError(f"needs a dict with keys 'pred' and 'score': {text[:80]!r}")
    pred, score = value["pred"], value["score"]
    if not isinstance(pred, str) or pred.strip().lower() not in ("yes", "no"):
        raise VerdictError(f"'pred' must be 'yes' or 'no', got {pred!r}")
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5:
        raise VerdictError(f"'score' must be an integer from 0 to 5, got {score!r}")
    return {"pred": pred.strip().lower(), "score": score}


def _transient(error: Exception) -> bool:
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(error, openai.APIStatusError) and (
        error.status_code in (408, 409, 425, 429) or error.status_code >= 500
    )


def _reply_text(reply) -> str | None:
    """The first choice's message text of a chat completion, None when the reply has none."""
    choices = getattr(reply, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    return getattr(message, "content", None)


class Judge:
    """A chat-completions client for the judge protocol (thread-safe; used from a pool of ``concurrency``)."""

    def __init__(self, cfg: JudgeConfig):
        try:
            import openai
        except ImportError:
            raise JudgeConfigError("the judge needs the openai package: pip install 'merv[judge]'") from None

        self.cfg = cfg
        self.preset = PRESETS[cfg.preset]
        # Retries are ours (counted, with their reasons), not the client's.
        self.client = openai.OpenAI(
            base_url=cfg.url, api_key=cfg.api_key() or "EMPTY", timeout=cfg.timeout_s, max_retries=0
        )
        self._stop = threading.Event()
        self.requests = 0
        self.retries: dict[str, int] = {}
        self.served_models: set[str] = set()
        self._lock = threading.Lock()
        self.model = cfg.model or self._only_served_model()

    # -- provenance ------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """What a result must record about its judge (no key)."""
        return {
            "url": redact_url(self.cfg.url),
            "model": self.model,
            "served_models": sorted(self.served_models),
            "prompt_version": PROMPT_VERSION,
            "preset": self.preset.name,
            "temperature": self.preset.temperature,
            "max_tokens": self.preset.max_tokens,
        }

    def verdict_key_fields(self) -> dict:
        """What a verdict depends on besides the question, answer and prediction."""
        return {
            "judge_model": self.model,
            "prompt_version": PROMPT_VERSION,
            "temperature": self.preset.temperature,
            "max_tokens": self.preset.max_tokens,
        }

    # -- requests -------------------------------------------------------------------------------------------
    def _count(self, reason: str) -> None:
        with self._lock:
            self.retries[reason] = self.retries.get(reason, 0) + 1

    def _with_retries(self, call: Callable[[], object], what: str):
        """``call()`` with retries on transient errors; :class:`JudgeUnavailable` when they run out."""
        import openai

        for attempt in range(1, self.cfg.max_attempts + 1):
            if self._stop.is_set():
                raise JudgeUnavailable("stopped: another request found the judge unavailable")
            try:
                with self._lock:
                    self.requests += 1
                return call()
            except openai.APIStatusError as e:
                if e.status_code in (401, 403, 404):
                    raise JudgeConfigError(
                        f"judge at {redact_url(self.cfg.url)} answered HTTP {e.status_code} to {what}: check the URL, "
                        f"the model name ({self.cfg.model!r}) and the API key"
                    ) from None
                if not _transient(e):
                    raise
                reason = f"http_{e.status_code}"
            except openai.APITimeoutError:
                reason = "timeout"
            except openai.APIConnectionError:
                reason = "connection"
            self._count(reason)
            if attempt == self.cfg.max_attempts:
                raise JudgeUnavailable(
                    f"judge at {redact_url(self.cfg.url)} failed {attempt} times in a row ({reason}) on {what}"
                )
            delay = min(self.cfg.backoff_s * 2 ** (attempt - 1), 30.0) * (0.5 + random.random())
            log.debug("judge %s on %s; retry %d in %.2fs", reason, what, attempt, delay)
            self._stop.wait(delay)
        raise AssertionError("unreachable")

    def _only_served_model(self) -> str:
        served = [m.id for m in self._with_retries(lambda: list(self.client.models.list()), "GET /models")]
        if len(served) != 1:
            raise JudgeConfigError(f"judge at {redact_url(self.cfg.url)} serves {served}: name one with --judge-model")
        return served[0]

    def _complete(self, messages: list[dict]):
        kwargs = {"model": self.model, "messages": messages, "max_tokens": self.preset.max_tokens}
        if self.preset.temperature is not None:
            kwargs["temperature"] = self.preset.temperature
        return self.client.chat.completions.create(**kwargs)

    def judge(self, question: str, answer: str, prediction: str, what: str = "a question") -> dict:
        """One verdict ``{"pred", "score", "served_model"}`` or ``{"unjudged": reason}``; raises
        :class:`JudgeUnavailable` / :class:`JudgeConfigError` for endpoint-wide failures."""
        import openai

        messages = judge_messages(question, answer, prediction)
        problem = ""
        for _ in range(self.cfg.parse_attempts):
            try:
                reply = self._with_retries(lambda: self._complete(messages), what)
                served = getattr(reply, "model", None) or self.model
                verdict = parse_verdict(_reply_text(reply))
                with self._lock:
                    self.served_models.add(served)
                return {**verdict, "served_model": served}
            except openai.APIStatusError as e:  # e.g. 400: this request cannot be judged; others may
                return {"unjudged": f"http {e.status_code}: {str(e)[:200]}"}
            except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
                problem = f"not a chat completion ({type(e).__name__})"  # e.g. a proxy's HTML error page
                self._count("unparseable")
            except VerdictError as e:
                problem = str(e)
                self._count("unparseable")
                log.debug("judge reply for %s did not parse: %s", what, problem)
        return {"unjudged": f"unparseable after {self.cfg.parse_attempts} attempts: {problem}"}

    def judge_all(self, items: Iterable[tuple[str, dict]], on_verdict: Callable[[str, dict], None]) -> None:
        """Judge ``(key, {"question", "answer", "prediction", "id"})`` items concurrently; ``on_verdict(key, verdict)``
        runs (under a lock) as each finishes, so it can store it at once. An endpoint-wide failure stops the pool
        (in-flight requests finish and are reported) and is raised."""
        done_lock = threading.Lock()

        def work(key: str, item: dict) -> None:
            verdict = self.judge(item["question"], item["answer"], item["prediction"], what=f"question {item['id']!r}")
            with done_lock:
                on_verdict(key, verdict)

        with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="judge") as pool:
            futures = [pool.submit(work, key, item) for key, item in items]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in finished if f.exception() is not None]
            if failed:
                self._stop.set()  # waiting retries wake up and give up; queued work is dropped
                pool.shutdown(wait=True, cancel_futures=True)
                raise failed[0].exception()
