"""How answers are decoded, one implementation for ``merv eval``, ``merv serve`` and lmms-eval's ``--model merv``:

- the sampling settings as transformers' ``generate`` kwargs (:func:`sampling_kwargs`; :data:`GREEDY`);
- stop strings: what of an answer a client sees (:func:`visible_text`, :func:`cut_at_stop`) and the stopping
  criterion that ends a row once its answer holds one (:class:`StopStrings`);
- continuations to score: an answer (an option letter) as the prompt format writes the start of the model's answer
  (:func:`answer_continuation`, :func:`letter_continuations`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria

from merv.prompting import option_letters

GREEDY = {"do_sample": False}  # what merv eval decodes with (and MERV.generate_batch's default)


def sampling_kwargs(
    temperature: float | None, do_sample: bool | None = None, top_p: float | None = None, top_k: int | None = None
) -> dict:
    """transformers' ``generate`` kwargs of a sampling request. Temperature 0 (or none, with ``do_sample`` unset) is
    greedy whatever ``do_sample`` says; a positive temperature samples unless ``do_sample`` is false; ``top_p`` and
    ``top_k`` apply only when sampling (None: not passed, transformers' default)."""
    sample = (temperature or 0) > 0 if do_sample is None else bool(do_sample)
    if temperature == 0:
        sample = False
    kwargs: dict[str, object] = {"do_sample": sample}
    if sample:
        if temperature is not None:
            kwargs["temperature"] = temperature
        kwargs |= {k: v for k, v in (("top_p", top_p), ("top_k", top_k)) if v is not None}
    return kwargs


def visible_text(text: str, stop: Sequence[str], final: bool) -> tuple[str, bool]:
    """The part of the decoded answer a client may see now, and whether a stop string was hit.

    Cut at the first stop string. While generating, hold back what might still change: an incomplete UTF-8
    character (decoded as U+FFFD), the start of a stop string, trailing whitespace (answers are stripped).
    """
    text = text.lstrip()
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        return text[: min(hits)].rstrip(), True
    if final:
        return text.rstrip(), False
    keep = len(text.rstrip().rstrip("\ufffd"))
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    return text[:keep].rstrip(), False


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The whole answer up to its first stop string, stripped."""
    return visible_text(text, stop, final=True)[0]


class StopStrings(StoppingCriteria):
    """Ends each row of a ``generate`` call once its answer, as ``generate_batch`` returns it (stripped), holds one of
    the stop strings. With ``inputs_embeds``, transformers passes only the generated tokens."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        hit = [visible_text(text, self.stop, final=True)[1] for text in texts]
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


def answer_continuation(new_builder: Callable, context: str, continuation: str) -> tuple[str, str]:
    """``(prompt, continuation)`` to score: the continuation as the prompt format writes the start of an answer
    (``" A"`` after vicuna's ``ASSISTANT:``), cut after its text so end-of-turn text is not scored. The whitespace
    before it is the format's, not the caller's delimiter. A format that rewrites answers gets the continuation as
    given. ``new_builder()`` gives a fresh prompt builder of the checkpoint's format."""
    builder = new_builder()
    prompt = builder.add_turn("human", context)
    answer = continuation.strip()
    if not answer:
        raise ValueError(f"continuation {continuation!r} has no text to score")
    full = builder.add_turn("gpt", answer)
    at = full.find(answer, len(prompt))
    if not full.startswith(prompt) or at < 0:
        return prompt, continuation
    return prompt, full[len(prompt) : at + len(answer)]


def letter_continuations(new_builder: Callable, message: str, num_options: int) -> list[str]:
    """Each option letter of a multiple-choice question as the start of the model's answer to ``message``: what
    ``merv eval --mcq likelihood`` scores (and lmms-eval's multiple-choice tasks, through
    :func:`answer_continuation`)."""
    return [answer_continuation(new_builder, message, letter)[1] for letter in option_letters(num_options)]
