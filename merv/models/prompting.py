"""Prompt formats: turn a conversation into token ids and labels, the same way for training and inference.

A conversation is tokenised turn piece by turn piece, so the prompt an inference call builds is token-for-token
the prefix the model saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100
VIDEO_PLACEHOLDERS = ("<video>", "<image>")

MCQ_INSTRUCTION = (
    "Select the correct answer from the following options. Write your answer as only one of {} and nothing else."
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class PromptFormat:
    """How user turns and answers are laid out as text."""

    system: str  # text before the first user turn ('' for none)
    user: str  # template with {message}; ends where the answer starts
    answer: str  # template with {message}; EOS is appended as a token, not text


FORMATS = {
    "vicuna": PromptFormat(system=VICUNA_SYSTEM + " ", user="USER: {message} ASSISTANT:", answer=" {message}"),
    "base": PromptFormat(system="", user="In: {message}\nOut:", answer=" {message}"),
}


def get_format(name: str) -> PromptFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown prompt format {name!r}; available: {sorted(FORMATS)}") from None


def clean_message(text: str) -> str:
    """Drop the ``<video>``/``<image>`` placeholder: visual tokens are spliced after BOS instead."""
    for tag in VIDEO_PLACEHOLDERS:
        text = text.replace(tag + "\n", "").replace(tag, "")
    return text.strip()


@dataclass
class PromptBuilder:
    """The original MERV API: ``add_turn(role, message)`` then ``get_prompt()`` (ends ready for the answer)."""

    format: str = "vicuna"
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

    def pieces(self) -> list[tuple[str, bool]]:
        """Text pieces with a flag 'is an answer' (answers get EOS and, in training, labels)."""
        fmt = get_format(self.format)
        out: list[tuple[str, bool]] = []
        for i, (role, message) in enumerate(self.turns):
            if role == "human":
                text = fmt.user.format(message=clean_message(message))
                out.append(((fmt.system if i == 0 else "") + text, False))
            else:
                out.append((fmt.answer.format(message=message.strip()), True))
        return out

    def get_prompt(self) -> str:
        return "".join(text for text, _ in self.pieces())


def conversation_to_ids(tokenizer, conversation: list[dict], prompt_format: str) -> tuple[list[int], list[int]]:
    """Video-LLaVA conversation -> ``(input_ids, labels)``; labels are IGNORE_INDEX except on answers + EOS."""
    builder = PromptBuilder(prompt_format)
    for turn in conversation:
        builder.add_turn(turn["from"], turn["value"])
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(ids)
    for text, is_answer in builder.pieces():
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_answer:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    return ids, labels


def prompt_to_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt string from :class:`PromptBuilder` -> input ids (with BOS when the tokenizer has one)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def option_letters(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise ValueError(f"a multiple-choice question needs 1 to 26 options, got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def mcq_prompt(question: str, options: list[str] | tuple[str, ...]) -> str:
    """The multiple-choice prompt of the original MERV evaluation (answer: one option letter)."""
    letters = option_letters(len(options))
    lines = "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters, options, strict=True))
    return f"{question} {MCQ_INSTRUCTION.format(', '.join(letters))}\n\n{lines}"
