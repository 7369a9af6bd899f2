"""From a chat request to a generation job: the conversation through the model's prompt builder, the one video (or
frame list) it carries decoded into each encoder's frames, and the token budget.

System (and developer) messages are ignored: each prompt format already carries the system prompt the model was
trained with, and an unfamiliar one would only move the prompt away from training.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from merv.data.video import resize_to, short_side_size
from merv.prompting import prompt_to_ids
from merv.serve.engine import Job, Sampling
from merv.serve.media import (
    MAX_FRAMES,
    MediaPolicy,
    decode_image,
    frame_list_tensors,
    frame_size,
    suffix_for,
    video_tensors,
)
from merv.serve.protocol import ChatRequest, ImagePart, ServeError, TextPart, VideoPart

OPENAI_DEFAULT_TEMPERATURE = 1.0
OPENAI_DEFAULT_TOP_P = 1.0


def conversation_prompt(model, request: ChatRequest) -> str:
    """User/assistant turns -> the prompt string, ending where the answer starts.

    Earlier answers end with the EOS token, as in training (``conversation_to_ids``): the prompt builder writes it
    as the tokenizer's EOS text, which the tokenizer maps back to the EOS id (checked by :func:`check_eos_text`).
    """
    builder = model.get_prompt_builder()
    turns = [m for m in request.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise ServeError(400, "messages: the last message must be a user message", "invalid_request", "messages")
    try:
        for m in turns:
            builder.add_turn(m.role, m.text())
    except ValueError as e:
        raise ServeError(400, f"messages: {e}", "invalid_request", "messages") from None
    return builder.get_prompt()


def check_eos_text(tokenizer) -> None:
    """The EOS text written after earlier answers must tokenize to the EOS id, or multi-turn prompts drift."""
    if tokenizer.eos_token is None:
        return
    ids = tokenizer("x" + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if ids[-1:] != [tokenizer.eos_token_id]:
        raise ValueError(f"the tokenizer does not map its EOS text {tokenizer.eos_token!r} to its EOS id")


def visual_content(request: ChatRequest) -> list[tuple[str, VideoPart | ImagePart]]:
    """The conversation's visual parts with their place (``messages.0.content.1``): one ``video_url``, or
    ``image_url`` frames, all in one user message."""
    found = [
        (i, [(f"messages.{i}.content.{j}", p) for j, p in enumerate(m.content) if not isinstance(p, TextPart)])
        for i, m in enumerate(request.messages)
        if m.visual_parts()
    ]
    if not found:
        raise ServeError(
            400,
            "messages: no video: a user message needs a video_url part or image_url frames",
            "no_video",
            "messages",
        )
    if len(found) > 1:
        places = " and ".join(f"messages.{i}" for i, _ in found)
        raise ServeError(400, f"one video per conversation; visual content in {places}", "too_many_videos", "messages")
    index, parts = found[0]
    if request.messages[index].role != "user":
        raise ServeError(400, f"messages.{index}: only user messages may carry a video", "invalid_request")
    if len(parts) > 1 and any(isinstance(p, VideoPart) for _, p in parts):
        raise ServeError(
            400,
            f"messages.{index}: one video_url part, or image_url frames, not both or several videos",
            "too_many_videos",
            f"messages.{index}.content",
        )
    if len(parts) > MAX_FRAMES:
        raise ServeError(
            400, f"messages.{index}: {len(parts)} frames, more than {MAX_FRAMES}", "too_many_frames", "messages"
        )
    return parts


async def load_visual(model, policy: MediaPolicy, request: ChatRequest, workdir: Path) -> dict:
    """Fetch and decode the conversation's video (decoding runs in a thread) -> ``{encoder: [T, 3, S, S]}``, within
    the request's pixel budget (each frame's size is read from its header first)."""
    parts = visual_content(request)
    budget = policy.budget()
    where, first = parts[0]
    if isinstance(first, VideoPart):
        param = f"{where}.video_url"
        source, hint = await policy.fetch(first.url, param)
        temporary = isinstance(source, bytes)
        if temporary:
            path = workdir / f"video{suffix_for(hint)}"
            path.write_bytes(source)
            what = f"{first.url.split(',')[0][:40]}, {len(source)} bytes"
        else:
            path, what = source, first.url
        return await asyncio.to_thread(video_tensors, model, path, what, param, temporary, budget)
    images, total, shape = [], 0, None
    for where, part in parts:
        param = f"{where}.image_url"
        source, _ = await policy.fetch(part.url, param)
        total += len(source) if isinstance(source, bytes) else source.stat().st_size
        if total > policy.max_bytes:
            raise policy.too_large(param, f"the frames so far: {total}")
        image = await asyncio.to_thread(decode_image, source, param, budget)
        # every frame takes the first one's shape at the decode size, as one video's frames would: resized as it
        # comes, so the request holds one full-size frame at a time
        shape = shape or short_side_size(image.shape[0], image.shape[1], frame_size(model))
        images.append((await asyncio.to_thread(resize_to, image[None], shape))[0])
    return await asyncio.to_thread(frame_list_tensors, model, images)


def token_budget(model, request: ChatRequest, prompt: str, default_max_tokens: int) -> tuple[int, int]:
    """``(prompt tokens incl. visual tokens, max new tokens)``, refused when over the model's context."""
    prompt_tokens = len(prompt_to_ids(model.tokenizer, prompt)) + model.cfg.visual_tokens
    context = model.cfg.llm.max_length
    room = context - prompt_tokens
    if room < 1:
        raise ServeError(
            400,
            f"messages: the prompt takes {prompt_tokens} tokens ({model.cfg.visual_tokens} visual); "
            f"the model's context is {context}",
            "context_length_exceeded",
            "messages",
        )
    wanted = request.requested_max_tokens
    if wanted is not None and wanted > room:
        raise ServeError(
            400,
            f"max_tokens: {wanted} + {prompt_tokens} prompt tokens exceed the model's context of {context}",
            "context_length_exceeded",
            "max_tokens",
        )
    return prompt_tokens, wanted or min(default_max_tokens, room)


def sampling_of(request: ChatRequest) -> Sampling:
    temperature = OPENAI_DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    top_p = OPENAI_DEFAULT_TOP_P if request.top_p is None else request.top_p
    return Sampling(temperature=temperature, top_p=top_p)


async def prepare_job(model, policy: MediaPolicy, request: ChatRequest, workdir, default_max_tokens: int):
    """``(Job, prompt tokens)`` for a validated request; the text checks run before any media is fetched."""
    prompt = conversation_prompt(model, request)
    prompt_tokens, max_tokens = token_budget(model, request, prompt, default_max_tokens)
    visual_content(request)
    videos = await load_visual(model, policy, request, workdir)
    job = Job(videos, prompt, max_tokens, sampling_of(request), request.stop_strings)
    return job, prompt_tokens
