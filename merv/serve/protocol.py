"""The OpenAI chat-completions protocol as merv serves it: request models, errors and response bodies.

Only what a video chat needs is modelled; unknown request fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit


class ServeError(Exception):
    """A request the server refuses: sent back as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> ServeError:
    """The most specific problem pydantic found, named by its place in the body (``messages.0.content.1.type``).

    Of a union's failed branches the deepest is reported: for a list of parts that is the bad part, not the
    complaint that the content is not a string either.
    """
    first = max(e.errors(), key=lambda err: len(err["loc"]))
    where = body_place(first["loc"])
    return ServeError(400, f"{where or 'body'}: {first['msg']}", "invalid_request", where or None)


def body_place(loc: tuple) -> str:
    """A pydantic error location without its union bookkeeping (branch types, model names, tag values)."""
    out, tag_next = [], False
    for part in loc:
        if isinstance(part, int):
            out.append(str(part))
            continue
        if tag_next:  # a tagged union's tag value follows the list index
            tag_next = False
            continue
        if "tagged-union[" in part:
            tag_next = True
            continue
        if "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "dict", "list", "none"):
            continue
        out.append(part)
    return ".".join(out)


# ------------------------------------------------------------------------------------------------------------------
# Request


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class URLRef(_Part):
    url: str


class TextPart(_Part):
    type: Literal["text"]
    text: str


class VideoPart(_Part):
    type: Literal["video_url"]
    video_url: URLRef | str  # vLLM/SGLang send {"url": ...}; a bare string is accepted too

    @property
    def url(self) -> str:
        return self.video_url if isinstance(self.video_url, str) else self.video_url.url


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: URLRef | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


Part = Annotated[TextPart | VideoPart | ImagePart, Field(discriminator="type")]


class Message(_Part):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def visual_parts(self) -> list[VideoPart | ImagePart]:
        return [] if not isinstance(self.content, list) else [p for p in self.content if not isinstance(p, TextPart)]


class StreamOptions(_Part):
    include_usage: bool = False


class ChatRequest(_Part):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # None: OpenAI's default, 1; 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(data: object) -> ChatRequest:
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


# ------------------------------------------------------------------------------------------------------------------
# Responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(cid: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage_,
    }


def chunk_body(cid: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None) -> dict:
    """One ``chat.completion.chunk``; the usage chunk (``stream_options.include_usage``) has no choices."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    body["choices"] = [] if usage_ is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    if usage_ is not None:
        body["usage"] = usage_
    return body
