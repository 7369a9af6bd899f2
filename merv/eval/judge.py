"""LLM judge for open-ended answers: the Video-ChatGPT protocol over the OpenAI chat-completions API.

The judge sees the question, the reference answer and the prediction, and replies with a Python-dict string
``{'pred': 'yes' | 'no', 'score': 0..5}``. Any OpenAI-compatible endpoint works: a local vLLM or SGLang server with an
open-weights model (recommended: its answers do not drift), or a hosted API with a key taken from an environment
variable or a file (never logged, never written anywhere).

Robustness: bounded concurrency (a thread pool), a timeout per request, retries with exponential backoff and jitter
on timeouts, connection errors, HTTP 408/409/429/5xx (never sooner than the endpoint's ``Retry-After``); a reply that
does not parse is asked again, then counted as *unjudged* with the reason -- never turned into "no", unless
``unparseable: no`` asks for the original batch script's rule. When the endpoint stays unreachable the run stops with
:class:`JudgeUnavailable` after saving every verdict it got; the next run resumes from the cache.

The protocol as data: ``prompt_file`` replaces the built-in wording with the user's own (for example Video-ChatGPT's
original, which merv does not ship); its sha256 goes into every verdict's cache key and the provenance manifest.

Keys: a remote endpoint without a key is refused before any request (a local one may have none), and error bodies
are redacted before they are stored (an endpoint or proxy may echo the request's ``Authorization`` header).
"""

from __future__ import annotations

import ast
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import threading
import time
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
    "for example {'pred': 'yes', 'score': 4}. Write nothing else."
)
PLACEHOLDERS = ("question", "answer", "prediction")
PLACEHOLDER = re.compile(r"\{(question|answer|prediction)\}")  # only these: other braces are text
MAX_REPLY_CHARS = 2000  # a verdict is ~30 characters; anything this long is not one
MAX_RETRY_AFTER_S = 120.0  # an endpoint asking for a longer wait is unavailable for this run
UNPARSEABLE = ("unjudged", "no")
REDACTED = "[redacted]"


@dataclass(frozen=True)
class JudgePrompt:
    """The judge's system and user messages; ``{question}``, ``{answer}`` and ``{prediction}`` in them are filled in
    (in one pass, so an answer containing ``{prediction}`` stays as it is); every other brace is text."""

    system: str
    user: str
    source: str  # "builtin" or the file it was read from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps({"system": self.system, "user": self.user}).encode()).hexdigest()

    def messages(self, question: str, answer: str, prediction: str) -> list[dict]:
        values = {"question": question, "answer": answer, "prediction": prediction}

        def fill(template: str) -> str:
            return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)

        messages = [{"role": "user", "content": fill(self.user)}]
        return ([{"role": "system", "content": fill(self.system)}] if self.system else []) + messages


BUILTIN_PROMPT = JudgePrompt(SYSTEM_PROMPT, USER_PROMPT, "builtin")


def load_prompt(path: str | Path) -> JudgePrompt:
    """A judge prompt from a YAML (or JSON) file with ``user`` (required) and ``system`` (optional) texts; the user
    text must name each of ``{question}``, ``{answer}`` and ``{prediction}``."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise JudgeConfigError(f"judge prompt_file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise JudgeConfigError(f"judge prompt_file {path}: not YAML or JSON ({e})") from None
    if not isinstance(data, dict):
        raise JudgeConfigError(f"judge prompt_file {path}: expected a mapping with 'system' and 'user' texts")
    if unknown := sorted(set(data) - {"system", "user"}):
        raise JudgeConfigError(f"judge prompt_file {path}: unknown keys {unknown} (expected 'system' and 'user')")
    system, user = data.get("system") or "", data.get("user")
    if not isinstance(user, str) or not isinstance(system, str):
        raise JudgeConfigError(f"judge prompt_file {path}: 'user' (and 'system', when given) must be texts")
    missing = [f"{{{name}}}" for name in PLACEHOLDERS if f"{{{name}}}" not in user]
    if missing:
        raise JudgeConfigError(f"judge prompt_file {path}: the user text has no {', '.join(missing)}")
    return JudgePrompt(system, user, str(path))


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
    prompt_file: str | None = None  # the judge's wording (YAML: system, user); None: merv's built-in wording
    unparseable: str = "unjudged"  # a reply that never parses: "unjudged" (ours) or "no" (score 0, the original's)
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
        if self.unparseable not in UNPARSEABLE:
            raise ValueError(f"judge unparseable must be one of {list(UNPARSEABLE)}, got {self.unparseable!r}")
        for name in ("concurrency", "max_attempts", "parse_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"judge {name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError(f"judge timeout_s must be > 0 and backoff_s >= 0, got {self.timeout_s}, {self.backoff_s}")

    def api_key(self) -> str | None:
        """The key from ``api_key_file`` or the ``api_key_env`` variable. None only for a local endpoint without
        one: a remote endpoint without a key is a :class:`JudgeConfigError`, before any request is sent."""
        if self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            if not path.is_file():
                raise JudgeConfigError(f"judge api_key_file {path} does not exist")
            key = path.read_text().strip()
            if not key:
                raise JudgeConfigError(f"judge api_key_file {path} is empty")
            return key
        key = os.environ.get(self.api_key_env) or None
        if key is None and not is_local(self.url):
            raise JudgeConfigError(
                f"judge at {redact_url(self.url)} needs an API key, but {self.api_key_env} is not set (set it, or "
                "give --judge-api-key-file); endpoints on this machine or a private network may have none"
            )
        return key

    def prompt(self) -> JudgePrompt:
        return load_prompt(self.prompt_file) if self.prompt_file else BUILTIN_PROMPT


ENV_KEYS = {"url": "MERV_JUDGE_URL", "model": "MERV_JUDGE_MODEL", "preset": "MERV_JUDGE_PRESET",
            "api_key_file": "MERV_JUDGE_API_KEY_FILE", "prompt_file": "MERV_JUDGE_PROMPT_FILE",
            "unparseable": "MERV_JUDGE_UNPARSEABLE"}  # fmt: skip


def is_local(url: str) -> bool:
    """An endpoint on this machine or a private network, named by address, ``localhost`` or a single-label host
    name (which only an intranet's DNS resolves): such servers (vLLM, SGLang) usually run without a key."""
    host = (urlsplit(url).hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost") or (host and "." not in host and ":" not in host):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def redact(text: str, secret: str | None) -> str:
    """``text`` without the key or anything shaped like a credential (an endpoint or proxy may echo the request's
    ``Authorization`` header in its error)."""
    if secret:
        text = text.replace(secret, REDACTED)
    text = re.sub(r"(?i)(authorization|api[-_]?key|x-api-key)(['\"]?\s*[:=]\s*)(bearer\s+)?[^\s;,'\"}]+",
                  rf"\1\2\3{REDACTED}", text)  # fmt: skip
    text = re.sub(r"(?i)bearer\s+(?!\[redacted\])[^\s;,'\"}]+", f"Bearer {REDACTED}", text)
    return re.sub(r"\bsk-[A-Za-z0-9_-]{8,}", REDACTED, text)


def retry_after_s(error: Exception) -> float | None:
    """The wait the endpoint asked for (``retry-after-ms``, ``Retry-After`` in seconds or as an HTTP date)."""
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


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


def judge_messages(question: str, answer: str, prediction: str, prompt: JudgePrompt = BUILTIN_PROMPT) -> list[dict]:
    return prompt.messages(question, answer, prediction)


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
        self.prompt = cfg.prompt()
        key = cfg.api_key()
        self._secret = key
        # Retries are ours (counted, with their reasons), not the client's. A local server without a key gets the
        # placeholder vLLM documents; a remote one never gets here without a key.
        self.client = openai.OpenAI(base_url=cfg.url, api_key=key or "EMPTY", timeout=cfg.timeout_s, max_retries=0)
        self._stop = threading.Event()
        self.requests = 0
        self.retries: dict[str, int] = {}
        self.served_models: set[str] = set()
        self._lock = threading.Lock()
        self.model = cfg.model or self._only_served_model()

    # -- provenance ------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """What a result must record about its judge (no key)."""
        builtin = self.prompt is BUILTIN_PROMPT
        return {
            "url": redact_url(self.cfg.url),
            "model": self.model,
            "served_models": sorted(self.served_models),
            "prompt_version": PROMPT_VERSION if builtin else None,
            "prompt_sha256": self.prompt.sha256,
            "prompt_file": None if builtin else self.prompt.source,
            "unparseable": self.cfg.unparseable,
            "preset": self.preset.name,
            "temperature": self.preset.temperature,
            "max_tokens": self.preset.max_tokens,
        }

    def verdict_key_fields(self) -> dict:
        """What a verdict depends on besides the question, answer and prediction (the built-in wording keeps the
        keys it always had, so verdicts cached before the prompt became data stay valid)."""
        fields = {
            "judge_model": self.model,
            "prompt_version": PROMPT_VERSION,
            "temperature": self.preset.temperature,
            "max_tokens": self.preset.max_tokens,
        }
        if self.prompt is not BUILTIN_PROMPT:
            fields["prompt_version"] = f"file:{self.prompt.sha256}"
        if self.cfg.unparseable != "unjudged":
            fields["unparseable"] = self.cfg.unparseable
        return fields

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
                reason, asked = f"http_{e.status_code}", retry_after_s(e)
            except openai.APITimeoutError:
                reason, asked = "timeout", None
            except openai.APIConnectionError:
                reason, asked = "connection", None
            self._count(reason)
            if attempt == self.cfg.max_attempts:
                raise JudgeUnavailable(
                    f"judge at {redact_url(self.cfg.url)} failed {attempt} times in a row ({reason}) on {what}"
                )
            if asked is not None and asked > MAX_RETRY_AFTER_S:
                raise JudgeUnavailable(
                    f"judge at {redact_url(self.cfg.url)} asked to wait {asked:.0f} s before retrying {what} "
                    f"({reason}): more than {MAX_RETRY_AFTER_S:.0f} s; run again later (verdicts so far are kept)"
                )
            delay = min(self.cfg.backoff_s * 2 ** (attempt - 1), 30.0) * (0.5 + random.random())
            delay = max(delay, asked or 0.0)  # never sooner than the endpoint asked
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

        messages = self.prompt.messages(question, answer, prediction)
        problem, served = "", self.model
        for _ in range(self.cfg.parse_attempts):
            try:
                reply = self._with_retries(lambda: self._complete(messages), what)
                served = getattr(reply, "model", None) or self.model
                verdict = parse_verdict(_reply_text(reply))
                with self._lock:
                    self.served_models.add(served)
                return {**verdict, "served_model": served}
            except openai.APIStatusError as e:  # e.g. 400: this request cannot be judged; others may
                return {"unjudged": f"http {e.status_code}: {redact(str(e), self._secret)[:200]}"}
            except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
                problem = f"not a chat completion ({type(e).__name__})"  # e.g. a proxy's HTML error page
                self._count("unparseable")
            except VerdictError as e:
                problem = redact(str(e), self._secret)
                self._count("unparseable")
                log.debug("judge reply for %s did not parse: %s", what, problem)
        reason = f"unparseable after {self.cfg.parse_attempts} attempts: {problem}"
        if self.cfg.unparseable == "no":  # the original batch script's rule, marked as such
            return {"pred": "no", "score": 0, "served_model": served, "counted_as_no": reason}
        return {"unjudged": reason}

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
