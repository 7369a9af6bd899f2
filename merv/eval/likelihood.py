"""Log-likelihood of continuations given a video and a text context: multiple choice without generation.

``continuation_logprobs`` is general (an lmms-eval ``loglikelihood`` request is exactly one (context, continuation)
pair): the videos are encoded once, every continuation is scored in one batched forward pass, only the logits of
the continuation positions are computed, and pairs that feed the model the same tokens share a row -- so the
option letters of a question cost one forward pass over its prompt, not one per option.

Tokenisation follows the language-model harnesses: the context and the continuation are tokenised *together* and
the continuation's tokens are the suffix beyond the context's tokens. Tokenising the continuation alone is wrong for
SentencePiece tokenizers (Llama-2 turns ``" A"`` on its own into two tokens, ``"▁"`` and ``"A"``/``"▁A"``, but into
one after ``"Out:"``). Whitespace at the end of the context is moved to the continuation first, as BPE and
SentencePiece tokenizers attach a space to the word that follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from merv.prompting import prompt_to_ids


def split_continuation(
    tokenizer, context: str, continuation: str, context_lengths: dict[str, int] | None = None
) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` whose concatenation is the joint tokenisation of context+continuation
    (with BOS when the tokenizer has one). Raises ValueError when the continuation yields no token of its own.
    ``context_lengths`` memoises the token count of contexts shared by several continuations."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    whole = prompt_to_ids(tokenizer, context + continuation)
    lengths = {} if context_lengths is None else context_lengths
    if context not in lengths:
        lengths[context] = len(prompt_to_ids(tokenizer, context))
    n_context = lengths[context]
    if n_context >= len(whole):
        raise ValueError(f"continuation {continuation!r} adds no token to its context (it merges into it)")
    return whole[:n_context], whole[n_context:]


@torch.no_grad()
def continuation_logprobs(
    model,
    videos: dict[str, torch.Tensor],
    contexts: Sequence[str],
    continuations: Sequence[str],
    video_index: Sequence[int] | None = None,
) -> list[tuple[float, bool]]:
    """For each (context, continuation): the summed log-probability of the continuation's tokens given the video
    and the context, and whether greedy decoding would produce exactly those tokens.

    ``videos`` is ``{encoder: [B, T, 3, S, S]}`` (transformed frames; moved to the model's device and dtype here).
    Pair i uses video ``video_index[i]``; by default video i when B equals the number of pairs, or the one video
    when B is 1 -- so the options of one question share a single encoding.
    """
    if len(contexts) != len(continuations) or not contexts:
        raise ValueError(f"need as many contexts as continuations (>0), got {len(contexts)} and {len(continuations)}")
    batch = next(iter(videos.values())).shape[0]
    if video_index is None:
        if batch not in (1, len(contexts)):
            raise ValueError(f"{batch} videos for {len(contexts)} pairs: pass video_index")
        video_index = [0] * len(contexts) if batch == 1 else list(range(batch))
    if len(video_index) != len(contexts) or not all(0 <= i < batch for i in video_index):
        raise ValueError(f"video_index must give each of the {len(contexts)} pairs one of the {batch} videos")

    lengths: dict[str, int] = {}
    pairs = [split_continuation(model.tokenizer, c, x, lengths) for c, x in zip(contexts, continuations, strict=True)]
    # A continuation's tokens are predicted from the sequence context + continuation[:-1]; pairs whose sequences
    # coincide (all options of a question when each is one token, e.g. option letters) share one row.
    rows: dict[tuple, int] = {}
    row_of = [rows.setdefault((v, tuple(c + x[:-1])), len(rows)) for v, (c, x) in zip(video_index, pairs, strict=True)]
    videos = {k: v.to(device=model.device, dtype=model.dtype) for k, v in videos.items()}
    visual, _ = model.encode(videos)  # [B, V, D], once per video
    visual = visual[torch.as_tensor([v for v, _ in rows], device=visual.device)]  # [R, V, D]
    # Left padding ends every row at the same position: the last K positions predict all continuation tokens.
    from merv.data.batching import pad_sequences

    ids, lengths = pad_sequences([list(seq) for _, seq in rows], value=0)
    has_video = torch.ones(len(rows), dtype=torch.bool)
    embeds, mask, _ = model.splice(visual, has_video, ids.to(visual.device), lengths, pad_left=True)
    # Real tokens get positions 0, 1, ... as in generation. Padding counts up to them (-2, -1) instead of repeating
    # 0: it is masked anyway, and a repeated position would make transformers treat each row as packed sequences
    # and build a slower mask.
    position_ids = torch.arange(mask.shape[1], device=mask.device) - (mask == 0).sum(-1, keepdim=True)
    longest = max(len(x) for _, x in pairs)
    logits = model.llm(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, logits_to_keep=longest
    ).logits  # [R, K, vocab]: the last K positions of each row
    logprobs = F.log_softmax(logits.float(), dim=-1)
    out = []
    for row, (_, cont) in zip(row_of, pairs, strict=True):
        tokens = torch.as_tensor(cont, device=logprobs.device)
        steps = logprobs[row, longest - len(cont) :]  # [len(cont), vocab]: step j predicts cont[j]
        total = steps.gather(-1, tokens[:, None]).sum().item()
        greedy = bool((steps.argmax(-1) == tokens).all())
        out.append((total, greedy))
    return out
