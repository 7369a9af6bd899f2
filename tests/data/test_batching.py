"""Training examples: the stage's text format and where text is cut, as the original does by default."""

import dataclasses

import pytest
import torch

from merv.data.batching import ExampleBuilder
from merv.prompting import IGNORE_INDEX

CAPTION = [
    {"from": "human", "value": "<video>\nDescribe the video."},
    {"from": "gpt", "value": " A red circle moves left, then up. "},
]


def sample(conversations, features: dict | None = None) -> dict:
    return {"meta": {"key": "k", "conversations": conversations}, "frames": None, "features": features}


def test_caption_text_is_the_original_align_format(tiny_model):
    """The original's align stage trains on '{caption}{eos}' after BOS, every token but BOS a target, and never
    sees the question."""
    tok = tiny_model.tokenizer
    got = ExampleBuilder(tiny_model.cfg, tok, text="caption")(sample(CAPTION))
    # AlignVideoDataset: tokenizer(caption.strip() + eos_token) with the BOS a Llama tokenizer puts first; labels
    # are the ids with BOS ignored
    ids = [tok.bos_token_id] + tok("A red circle moves left, then up." + tok.eos_token, add_special_tokens=False)[
        "input_ids"
    ]
    assert got["input_ids"] == ids and ids[-1] == tok.eos_token_id
    assert got["labels"] == [IGNORE_INDEX] + ids[1:]
    conversation = ExampleBuilder(tiny_model.cfg, tok)(sample(CAPTION))
    assert len(conversation["input_ids"]) > len(ids), "the conversation format also holds the question"


def test_caption_text_needs_one_question_and_answer(tiny_model):
    builder = ExampleBuilder(tiny_model.cfg, tiny_model.tokenizer, text="caption")
    with pytest.raises(ValueError, match="sample 'k': caption text takes a conversation of one question"):
        builder(sample(CAPTION * 2))


@pytest.mark.parametrize(("truncation", "video"), [("text", True), ("text", False), ("sequence", True)])
def test_text_is_cut_on_its_own_before_the_visual_tokens(tiny_model, truncation, video):
    """The original cuts a sample's text to max_length tokens, then adds the visual tokens ('text');
    'sequence' makes text and visual tokens fit max_length together."""
    cfg = tiny_model.cfg
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, truncation=truncation))
    long = [{"from": "human", "value": "Describe the video."}, {"from": "gpt", "value": "left up " * 400}]
    features = {e.id: torch.zeros(1) for e in cfg.encoders} if video else None
    got = ExampleBuilder(cfg, tiny_model.tokenizer, cached=frozenset(cfg.frame_counts))(sample(long, features))
    limit = cfg.llm.max_length - (cfg.visual_tokens if truncation == "sequence" and video else 0)
    assert cfg.llm.max_length == 256 and len(got["input_ids"]) == len(got["labels"]) == limit
