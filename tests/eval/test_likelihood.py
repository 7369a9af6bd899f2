"""Continuation log-likelihoods: batched and padded scores equal one-at-a-time ones; SentencePiece-safe splitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from merv.data.batching import encoder_frames
from merv.data.shards import iter_samples
from merv.eval.likelihood import continuation_logprobs, split_continuation
from merv.prompting import mcq_prompt


def _videos(model, shard_dir, n):
    samples = [encoder_frames(model, s) for _, s in zip(range(n), iter_samples(shard_dir), strict=False)]
    return {name: torch.stack([s[name] for s in samples]) for name in model.encoders}


@torch.no_grad()
def _reference(model, video: dict, context: str, continuation: str) -> tuple[float, bool, list[int]]:
    """One pair alone, no padding, full logits: the definition the batched scorer must match."""
    ctx, cont = split_continuation(model.tokenizer, context, continuation)
    visual, _ = model.encode({k: v[None] for k, v in video.items()})
    ids = torch.tensor([ctx + cont])
    embeds, mask, _ = model.splice(visual, torch.tensor([True]), ids, torch.tensor([ids.shape[1]]))
    logprobs = F.log_softmax(model.llm(inputs_embeds=embeds, attention_mask=mask).logits[0].float(), -1)
    steps = logprobs[-len(cont) - 1 : -1]
    tokens = torch.tensor(cont)
    return steps.gather(-1, tokens[:, None]).sum().item(), bool((steps.argmax(-1) == tokens).all()), ctx


def test_batched_scores_equal_single_unpadded_ones(tiny_model, shards):
    model = tiny_model.eval()
    videos = _videos(model, shards["synth_mcq"], 2)
    builder = model.get_prompt_builder()
    long_prompt = builder.add_turn("human", mcq_prompt("Which way does the shape move first?", ["left", "right"]))
    short_prompt = model.get_prompt_builder().add_turn("human", "Colour?")
    pairs = [  # (video, context, continuation): different lengths on both sides, so rows are padded differently
        (0, long_prompt, " A"),
        (0, long_prompt, " B"),
        (1, short_prompt, " red then blue"),
        (1, long_prompt, " left"),
    ]
    rows = []
    hook = model.llm.register_forward_pre_hook(lambda _, args, kw: rows.append(kw["inputs_embeds"].shape[0]),
                                               with_kwargs=True)  # fmt: skip
    try:
        scores = continuation_logprobs(
            model, videos, [c for _, c, _ in pairs], [x for _, _, x in pairs], video_index=[v for v, _, _ in pairs]
        )
    finally:
        hook.remove()
    assert rows == [3], "one forward pass; ' A' and ' B' after the same prompt and video share one row"
    for (v, context, cont), (total, greedy) in zip(pairs, scores, strict=True):
        ref_total, ref_greedy, _ = _reference(model, {k: t[v] for k, t in videos.items()}, context, cont)
        assert total == pytest.approx(ref_total, abs=1e-4) and greedy == ref_greedy
    assert scores[0][0] != scores[1][0], "options are told apart"

    # one video broadcast to every pair equals passing it once per pair
    one = {k: t[:1] for k, t in videos.items()}
    broadcast = continuation_logprobs(model, one, [long_prompt] * 2, [" A", " B"])
    assert [s for s, _ in broadcast] == pytest.approx([s for s, _ in scores[:2]], abs=1e-4)


def test_greedy_flag_marks_the_argmax_continuation(tiny_model, shards):
    model = tiny_model.eval()
    video = {k: t[0] for k, t in _videos(model, shards["synth_open"], 1).items()}
    context = model.get_prompt_builder().add_turn("human", "What colour is the moving shape?")
    _, _, ctx = _reference(model, video, context, " red")
    visual, _ = model.encode({k: v[None] for k, v in video.items()})
    embeds, mask, _ = model.splice(visual, torch.tensor([True]), torch.tensor([ctx]), torch.tensor([len(ctx)]))
    best = int(model.llm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].argmax())
    text = model.tokenizer.decode([best])
    assert split_continuation(model.tokenizer, context, text)[1] == [best], "the argmax token round-trips"
    others = [t for t in (" red", " blue", " left") if split_continuation(model.tokenizer, context, t)[1] != [best]]
    scores = continuation_logprobs(model, {k: v[None] for k, v in video.items()}, [context] * 3, [text, *others[:2]])
    assert [g for _, g in scores] == [True, False, False]
    assert scores[0][0] > max(s for s, _ in scores[1:])


def _sentencepiece_like_tokenizer():
    """A Llama-2 style tokenizer (BPE on '▁'-joined text, '▁' prepended), trained here: no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    corpus = [f"In: Which colour? Out: {x}" for x in "ABCD"] * 20 + ["In: What? Out: red", "left right up down"] * 20
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_continuation_tokens_come_from_the_joint_tokenisation():
    tok = _sentencepiece_like_tokenizer()
    alone = tok(" A", add_special_tokens=False)["input_ids"]
    assert len(alone) == 2, "the Llama-2 pitfall: ' A' on its own is '▁' + '▁A'"
    ctx, cont = split_continuation(tok, "In: Which colour? Out:", " A")
    assert tok.convert_ids_to_tokens(cont) == ["▁A"] and ctx[0] == tok.bos_token_id
    assert ctx + cont == [tok.bos_token_id] + tok("In: Which colour? Out: A", add_special_tokens=False)["input_ids"]
    # a space left at the end of the context moves to the continuation, where the tokenizer attaches it
    assert split_continuation(tok, "In: Which colour? Out: ", "A") == (ctx, cont)
