"""From a request to a job: the prompt the model was trained with, frames sampled from a list, folder checks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from merv.data.video import sample_frame_indices
from merv.prompting import conversation_to_ids, prompt_to_ids
from merv.serve.chat import check_eos_text, conversation_prompt
from merv.serve.media import MediaPolicy, frame_list_tensors
from merv.serve.protocol import ServeError, parse_request


def test_multi_turn_prompt_matches_training(tiny_model):
    """Earlier answers end with EOS exactly as conversation_to_ids lays them out in training."""
    request = parse_request(
        {
            "model": "merv-tiny",
            "messages": [
                {"role": "system", "content": "ignored"},
                {"role": "user", "content": [{"type": "text", "text": "What moves?"}]},
                {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "Where to?"},
                {"role": "assistant", "content": "Left."},
                {"role": "user", "content": "How fast?"},
            ],
        }
    )
    check_eos_text(tiny_model.tokenizer)
    ids = prompt_to_ids(tiny_model.tokenizer, conversation_prompt(tiny_model, request))
    turns = [("human", "What moves?"), ("gpt", "A red circle."), ("human", "Where to?"), ("gpt", "Left.")]
    trained, _ = conversation_to_ids(
        tiny_model.tokenizer, [{"from": r, "value": v} for r, v in turns], tiny_model.cfg.llm.prompt_format
    )
    assert ids[: len(trained)] == trained
    assert tiny_model.tokenizer.decode(ids[len(trained) :]) == "In: How fast?\nOut:"


def test_frame_list_is_sampled_uniformly_per_encoder(tiny_model):
    frames = [np.full((20 + i, 30, 3), 10 * i, dtype=np.uint8) for i in range(10)]  # sizes differ; value = index
    got = frame_list_tensors(tiny_model, frames)
    size = max(e.image_size for e in tiny_model.encoders.values())
    for name, enc in tiny_model.encoders.items():
        picked = np.stack(
            [np.full((size, size, 3), 10 * i, np.uint8) for i in sample_frame_indices(10, enc.num_frames)]
        )
        expected = tiny_model.transform({n: picked for n in tiny_model.encoders})[name]
        assert got[name].shape == (enc.num_frames, 3, enc.image_size, enc.image_size)
        torch.testing.assert_close(got[name], expected)


def test_allowed_folders_follow_symlinks_and_check_sizes(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(b"x")
    (allowed / "link.mp4").symlink_to(outside / "secret.mp4")
    (allowed / "ok.mp4").write_bytes(b"x")
    policy = MediaPolicy((allowed,), max_bytes=100, download_timeout_s=1)
    assert policy.local_path((allowed / "ok.mp4").as_uri(), "p") == (allowed / "ok.mp4").resolve()
    for url in [(allowed / "link.mp4").as_uri(), f"file://{allowed}/../outside/secret.mp4"]:
        with pytest.raises(ServeError) as e:
            policy.local_path(url, "p")
        assert e.value.status == 403 and "outside the allowed folders" in e.value.message
    with pytest.raises(ServeError) as e:
        MediaPolicy((), 100, 1).local_path((allowed / "ok.mp4").as_uri(), "p")
    assert e.value.status == 403 and "--allowed-dir" in e.value.message
    with pytest.raises(ServeError) as e:
        policy.decode_data_url("data:video/mp4;base64," + "A" * 200, "p")  # refused before decoding
    assert e.value.status == 413
    with pytest.raises(ServeError) as e:
        asyncio.run(policy.fetch("gopher://x/y.mp4", "p"))
    assert e.value.status == 400 and "unsupported URL scheme 'gopher'" in e.value.message
