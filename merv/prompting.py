"""Prompt formats: turn a conversation into token ids and labels, the same way for training and inference.

A conversation is rendered to one string (answers followed by the EOS token's text for the built-in formats) and
tokenised in one call; a token is a target when its first character lies inside an answer. Inference tokenises the
prompt string the same way, so its ids are token for token the prefix the model saw in training, for byte-level BPE
and for SentencePiece tokenizers alike (whose normalizer turns a lone ``" A"`` into two tokens but ``"Out: A"`` into
``Out : ▁A``): nothing is tokenised out of context.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

IGNORE_INDEX = -100
VIDEO_PLACEHOLDERS = ("<video>", "<image>")

MCQ_INSTRUCTION = (
    "Select the correct answer from the following options. Write your answer as only one of {} and nothing else."
)

LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class PromptFormat:
    """How user turns and answers are laid out as text (EOS after an answer is a token, not text)."""

    user: str  # template with {message}; ends where the answer starts
    answer: str = " {message}"
    first_user: str | None = None  # template of the first user turn (system prompt inside), default ``user``


FORMATS = {
    "vicuna": PromptFormat(user="USER: {message} ASSISTANT:", first_user=VICUNA_SYSTEM + " USER: {message} ASSISTANT:"),
    "llama2-chat": PromptFormat(
        user="<s>[INST] {message} [/INST]",
        first_user="[INST] <<SYS>>\n" + LLAMA2_SYSTEM + "\n<</SYS>>\n\n{message} [/INST]",
    ),
    "base": PromptFormat(user="In: {message}\nOut:"),
}
CHAT_TEMPLATE = "chat-template"  # the tokenizer's own chat template (Qwen2.5, Llama-3 instruct, ...)


def get_format(name: str) -> PromptFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown prompt format {name!r}; available: {sorted(FORMATS) + [CHAT_TEMPLATE]}") from None


def clean_message(text: str) -> str:
    """Drop the ``<video>``/``<image>`` placeholder: visual tokens are spliced after BOS instead."""
    for tag in VIDEO_PLACEHOLDERS:
        text = text.replace(tag + "\n", "").replace(tag, "")
    return text.strip()


@dataclass
class PromptBuilder:
    """The original MERV API: ``add_turn(role, message)`` then ``get_prompt()`` (ends ready for the answer).

    ``format`` is a built-in format name or ``"chat-template"``, which renders through ``tokenizer``.
    """

    format: str = "vicuna"
    tokenizer: object = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def add_turn(self, role: str, message: str) -> str:
        expected = "human" if len(self.turns) % 2 == 0 else "gpt"
        if role not in ("human", "gpt", "user", "assistant"):
            raise ValueError(f"unknown role {role!r}; use 'human' or 'gpt'")
        role = {"user": "human", "assistant": "gpt"}.get(role, role)
        if role != expected:
            raise ValueError(f"turns must alternate human/gpt; expected {expected!r}, got {role!r}")
        self.turns.append((role, message))
        return self.get_prompt()

    @property
    def eos_after_answer(self) -> bool:
        """Built-in formats end an answer with the EOS token; chat templates write their own end-of-turn text."""
        return self.format != CHAT_TEMPLATE

    def pieces(self) -> list[tuple[str, bool]]:
        """Text pieces with a flag 'is an answer' (answers are the training targets). With a tokenizer, the built-in
        formats follow each answer with the EOS token's text, which the tokenizer reads back as the EOS token."""
        if self.format == CHAT_TEMPLATE:
            return self._template_pieces()
        fmt = get_format(self.format)
        eos = getattr(self.tokenizer, "eos_token", None) if self.tokenizer is not None else None
        out: list[tuple[str, bool]] = []
        for i, (role, message) in enumerate(self.turns):
            if role == "human":
                template = fmt.first_user if i == 0 and fmt.first_user else fmt.user
                out.append((template.format(message=clean_message(message)), False))
            else:
                out.append((fmt.answer.format(message=message.strip()) + (eos or ""), True))
        return out

    def _template_pieces(self) -> list[tuple[str, bool]]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat-template' needs a tokenizer that has a chat template")
        messages, out, rendered = [], [], ""
        for role, message in self.turns:
            is_answer = role == "gpt"
            content = message.strip() if is_answer else clean_message(message)
            messages.append({"role": "assistant" if is_answer else "user", "content": content})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not is_answer)
            if not text.startswith(rendered):
                raise ValueError("the tokenizer's chat template does not render conversations incrementally")
            out.append((text[len(rendered) :], is_answer))
            rendered = text
        return out

    def get_prompt(self) -> str:
        return "".join(text for text, _ in self.pieces())


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    """Prefix BOS when the tokenizer has one and the text did not already start with it (Llama-3 templates do)."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def _ids_and_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} cannot report character offsets; merv needs a fast "
            "(tokenizers-backed) tokenizer"
        ) from None
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def check_option_letters(tokenizer, prompt_format: str) -> None:
    """Multiple-choice answers are option letters: after a prompt, each of A-Z must add exactly one token (in
    context, as the model would generate it: a SentencePiece ``" A"`` alone is two tokens, after ``"Out:"`` one)."""
    builder = PromptBuilder(prompt_format, tokenizer)
    builder.add_turn("human", "Which option?")
    prompt = builder.get_prompt()
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = "{message}" if prompt_format == CHAT_TEMPLATE else get_format(prompt_format).answer
    bad = []
    for letter in (chr(ord("A") + i) for i in range(26)):
        ids = tokenizer(prompt + answer.format(message=letter), add_special_tokens=False)["input_ids"]
        if len(ids) != len(base) + 1 or ids[: len(base)] != base:
            bad.append(letter)
    if bad:
        raise ValueError(f"option letters {bad} are not single tokens for prompt format {prompt_format!r}")


def conversation_to_ids(tokenizer, conversation: list[dict], prompt_format: str) -> tuple[list[int], list[int]]:
    """Video-LLaVA conversation -> ``(input_ids, labels)``; labels are IGNORE_INDEX except on answers (+ EOS)."""
    builder = PromptBuilder(prompt_format, tokenizer)
    for turn in conversation:
        builder.add_turn(turn["from"], turn["value"])
    text, starts, ends, pos = "", [], [], 0
    for piece, is_answer in builder.pieces():
        if is_answer:
            starts.append(pos)
            ends.append(pos + len(piece))
        text += piece
        pos += len(piece)
    ids, offsets = _ids_and_offsets(tokenizer, text)

    def in_answer(char: int) -> bool:
        i = bisect.bisect_right(starts, char) - 1
        return i >= 0 and char < ends[i]

    labels = [tok if in_answer(start) else IGNORE_INDEX for tok, (start, _) in zip(ids, offsets, strict=True)]
    full = _with_bos(tokenizer, ids)
    return full, [IGNORE_INDEX] * (len(full) - len(ids)) + labels


def caption_to_ids(tokenizer, conversation: list[dict], where: str = "sample") -> tuple[list[int], list[int]]:
    """The original's align-stage text: the answer of a one-question conversation alone, as ``BOS caption EOS``,
    every token but BOS a target (the question, e.g. "Describe the video.", is not seen at all)."""
    if len(conversation) != 2 or any(tag in conversation[-1]["value"] for tag in VIDEO_PLACEHOLDERS):
        raise ValueError(
            f"{where}: caption text takes a conversation of one question and one answer without "
            f"{'/'.join(VIDEO_PLACEHOLDERS)} in the answer, got {len(conversation)} turns"
        )
    text = conversation[-1]["value"].strip() + (tokenizer.eos_token or "")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = _with_bos(tokenizer, ids)
    return full, [IGNORE_INDEX] * (len(full) - len(ids)) + list(ids)


def prompt_to_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt string from :class:`PromptBuilder` -> input ids (with BOS when the tokenizer has one)."""
    return _with_bos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"])


def option_letters(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise ValueError(f"a multiple-choice question needs 1 to 26 options, got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def mcq_prompt(question: str, options: list[str] | tuple[str, ...]) -> str:
    """The multiple-choice prompt of the original MERV evaluation (answer: one option letter), character for
    character: the options follow a blank line and four spaces, one a line (the spaces come from the indentation of
    the original's prompt literal, so only the first option's line carries them)."""
    letters = option_letters(len(options))
    lines = "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters, options, strict=True))
    return f"{question} {MCQ_INSTRUCTION.format(', '.join(letters))}\n\n    {lines}"
