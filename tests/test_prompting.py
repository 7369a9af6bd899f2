"""Prompt formats: built-in ones, the tokenizer's chat template, BOS-less tokenizers, option letters."""

import copy

import pytest
import torch

from merv.models.merv import MERV
from merv.prompting import (
    IGNORE_INDEX,
    PromptBuilder,
    check_option_letters,
    conversation_to_ids,
    prompt_to_ids,
)

CONV = [
    {"from": "human", "value": "<video>\nWhat colour is the moving shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Which shape is in the video?"},
    {"from": "gpt", "value": "circle"},
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def answers(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("fmt", ["vicuna", "llama2-chat", "base"])
def test_builtin_formats_label_only_answers(tiny_model, fmt):
    tok = tiny_model.tokenizer
    ids, labels = conversation_to_ids(tok, CONV, fmt)
    assert ids[0] == tok.bos_token_id and len(ids) == len(labels)
    assert answers(tok, ids, labels).replace(tok.eos_token, "|") == " red| circle|"
    builder = PromptBuilder(fmt, tok)
    builder.add_turn("human", CONV[0]["value"])
    prompt_ids = prompt_to_ids(tok, builder.get_prompt())
    assert ids[: len(prompt_ids)] == prompt_ids, "inference prompt = the training prefix, token for token"


def test_llama2_chat_layout():
    builder = PromptBuilder("llama2-chat")
    for turn in CONV:
        builder.add_turn(turn["from"], turn["value"])
    text = builder.get_prompt()
    assert text.startswith("[INST] <<SYS>>\n") and "<</SYS>>\n\nWhat colour is the moving shape? [/INST] red" in text
    assert "<s>[INST] Which shape is in the video? [/INST] circle" in text


@pytest.fixture
def chat_tokenizer(tiny_model):
    tok = copy.deepcopy(tiny_model.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.bos_token = None  # like Qwen2.5: no BOS
    return tok


def test_chat_template_and_no_bos(chat_tokenizer):
    tok = chat_tokenizer
    assert tok.bos_token_id is None
    ids, labels = conversation_to_ids(tok, CONV, "chat-template")
    assert tok.decode(ids[:1]) == "<|im_start|>", "no BOS is added for a BOS-less tokenizer"
    assert answers(tok, ids, labels) == "red<|im_end|>\ncircle<|im_end|>\n", "end-of-turn text is learned"
    builder = PromptBuilder("chat-template", tok)
    builder.add_turn("human", "<video>\nHi")
    assert builder.get_prompt() == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat template"):
        PromptBuilder("chat-template").add_turn("human", "Hi")


def test_visual_tokens_come_first_without_bos(tiny_model, chat_tokenizer):
    tiny_model.llm.resize_token_embeddings(len(chat_tokenizer))
    try:
        model = MERV(tiny_model.cfg, tiny_model.llm, chat_tokenizer, dict(tiny_model.encoders))
        visual = torch.randn(1, 16, 128)
        ids = prompt_to_ids(chat_tokenizer, "<|im_start|>user\nHi<|im_end|>\n")
        embeds, mask, _ = model.splice(visual, torch.tensor([True]), torch.tensor([ids]), torch.tensor([len(ids)]))
        assert torch.equal(embeds[0, :16], visual[0])
        text = model.llm.get_input_embeddings()(torch.tensor(ids))
        assert torch.allclose(embeds[0, 16:], text)
    finally:
        tiny_model.llm.resize_token_embeddings(len(tiny_model.tokenizer))


def test_option_letters_must_be_single_tokens(tiny_model):
    check_option_letters(tiny_model.tokenizer, "base")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    char_level = Tokenizer(models.WordLevel({"<unk>": 0, "Ġ": 1, "A": 2}, unk_token="<unk>"))
    char_level.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=char_level, unk_token="<unk>")
    with pytest.raises(ValueError, match=r"option letters \['A', 'B'"):
        check_option_letters(tok, "base")


# ---------------------------------------------------------------------------------------------------------------
# A real SentencePiece tokenizer (Llama-2 algorithm, 32000 pieces) in both tokenizer.json forms


@pytest.fixture
def spm_tok(spm_llm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spm_llm)


def test_the_fixture_is_the_real_sentencepiece_model(spm_tok, spm_model, spm_llm):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    assert len(spm_tok) == sp.vocab_size() == 32000
    for text in ("In: What colour is the moving shape?\nOut: red", "A chat between a curious user"):
        assert spm_tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    lone = len(spm_tok(" A", add_special_tokens=False)["input_ids"])
    assert lone == (2 if "legacy" in spm_llm.name else 1), "why letters are checked in context, not alone"


@pytest.mark.parametrize("fmt", ["base", "vicuna", "llama2-chat"])
def test_sentencepiece_labels_decode_to_the_answers(spm_tok, fmt):
    check_option_letters(spm_tok, fmt)  # each of A-Z is one token where an answer starts
    conv = [*CONV, {"from": "human", "value": "Pick one.\n\nA. dog\nB. cat"}, {"from": "gpt", "value": "B"}]
    ids, labels = conversation_to_ids(spm_tok, conv, fmt)
    assert ids[0] == spm_tok.bos_token_id and len(ids) == len(labels)
    spans, current = [], []
    for tok, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            current.append(tok)
        elif current:
            spans.append(current)
            current = []
    assert [spm_tok.decode(s) for s in spans + [current] if s] == ["red</s>", "circle</s>", "B</s>"]
    builder = PromptBuilder(fmt, spm_tok)
    for turn in conv[:3]:
        builder.add_turn(turn["from"], turn["value"])
    prompt_ids = prompt_to_ids(spm_tok, builder.get_prompt())
    assert ids[: len(prompt_ids)] == prompt_ids, "the inference prompt is the training prefix, token for token"
    first = ids[len(prompt_ids)]  # the token the model must generate first after that prompt
    piece = spm_tok.decode([first]).strip()
    assert labels[len(prompt_ids)] == first and piece and "circle".startswith(piece)
