"""The OpenAI-compatible routes of ``merv serve``: ``POST /v1/chat/completions`` (whole or streamed),
``GET /v1/models[/{id}]``, and ``GET /health`` with the batching statistics."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from merv.serve.chat import prepare_job
from merv.serve.context import ServedDep
from merv.serve.engine import Result
from merv.serve.guard import read_body, require_json
from merv.serve.protocol import ServeError, chunk_body, completion_body, completion_id, parse_request, usage

router = APIRouter()


@router.get("/v1/models")
async def models(s: ServedDep):
    return {"object": "list", "data": [s.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def model_info(model_id: str, s: ServedDep):
    s.check_model(model_id)
    return s.model_card()


@router.get("/health")
async def health(s: ServedDep):
    return {
        "status": "ok",
        "model": s.name,
        "device": str(s.model.device),
        "dtype": str(s.model.dtype).removeprefix("torch."),
        "queued": s.engine.queue.qsize(),
        "max_batch": s.settings.max_batch,
        **s.engine.stats.to_dict(),
    }


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, s: ServedDep):
    require_json(request)
    body = await read_body(request, s.body_limit)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ServeError(400, f"the request body is not JSON ({str(e)[:200]})", "invalid_json") from None
    except RecursionError:
        raise ServeError(400, "the request body is nested too deeply", "invalid_json") from None
    req = parse_request(data)
    s.check_model(req.model)
    with tempfile.TemporaryDirectory(prefix="merv-serve-") as workdir:
        job, prompt_tokens = await prepare_job(s.model, s.policy, req, Path(workdir), s.settings.default_max_tokens)
    cid = completion_id()
    if req.stream:
        job.stream = asyncio.Queue()
        s.engine.submit(job)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_events(job, s.name, cid, prompt_tokens, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    job.future = asyncio.get_running_loop().create_future()
    s.engine.submit(job)
    try:
        result = await job.future
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    except Exception as e:
        raise ServeError(500, f"generation failed: {e}", "generation_failed") from None
    counts = usage(prompt_tokens, result.completion_tokens)
    return completion_body(cid, s.name, result.text, result.finish_reason, counts)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_events(job, name: str, cid: str, prompt_tokens: int, include_usage: bool):
    """``chat.completion.chunk`` events: the role, text deltas, the finish reason, [usage], then ``[DONE]``."""
    try:
        yield sse(chunk_body(cid, name, {"role": "assistant", "content": ""}))
        while True:
            item = await job.stream.get()
            if isinstance(item, str):
                yield sse(chunk_body(cid, name, {"content": item}))
                continue
            if isinstance(item, Result):
                yield sse(chunk_body(cid, name, {}, item.finish_reason))
                if include_usage:
                    yield sse(chunk_body(cid, name, {}, usage_=usage(prompt_tokens, item.completion_tokens)))
            else:  # the status line is sent already: report the failure in the stream, as vLLM does
                yield sse(ServeError(500, f"generation failed: {item}", "generation_failed").body())
            break
        yield sse("[DONE]")
    finally:
        job.cancelled = True  # a client gone mid-answer frees its row at the next token
