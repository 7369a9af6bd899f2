"""merv as an lmms-eval model: ``python -m lmms_eval --model merv --model_args pretrained=<checkpoint folder>``.

lmms-eval (0.6.1 and later) finds the class through the ``lmms_eval.models`` entry point that merv's ``pyproject.toml``
declares (:func:`merv.integrations.lmms_eval_manifest`). It is a "simple" model: each request brings the task's text
(its context), a ``doc_to_visual`` function and the document's id, and

- ``generate_until``: the context goes through the checkpoint's prompt builder as the user's turn; the answer is
  ``model.generate_batch`` (greedy unless the task samples), cut at the first of the task's ``until`` strings;
- ``loglikelihood``: ``merv.eval.likelihood.continuation_logprobs`` of the continuation written as the start of the
  model's answer (as ``merv eval --mcq likelihood`` scores option letters), every request of a document on one
  decoding and encoding of its video. lmms-eval's models return a *loss* there, whatever its docstring says: its
  ``multiple_choice`` scoring picks the option with the *smallest* first element. So the first element is the
  continuation's negative log-probability (summed over its tokens: the option ``merv eval`` picks is lmms-eval's).

Visuals are sampled per encoder as the checkpoint's config says, with the code ``merv generate`` and ``merv serve``
use: :func:`merv.data.video.read_frames` (uniform over the clip, one decode for every encoder's frame count) at
:func:`merv.data.transforms.frame_size`, then each encoder's own transform. Requests are answered in batches of
``batch_size`` in the order lmms-eval gives them (grouped by generation settings), so the batches of a benchmark are
those of ``merv eval`` at the same batch size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteriaList

try:
    from lmms_eval.api.model import lmms
except ImportError as e:  # an optional dependency
    raise ImportError("merv's lmms-eval model needs lmms-eval: pip install 'merv[lmms-eval]'") from e

from merv.data.video import VideoError, read_frames, resize_to, sample_frame_indices, short_side_size
from merv.decoding import StopStrings, answer_continuation, cut_at_stop, sampling_kwargs

log = logging.getLogger(__name__)

# generation kwargs handed to transformers' generate as they are (the others are read below, or warned about)
PASSED_THROUGH = ("num_beams", "repetition_penalty")
SAMPLING_ONLY = ("top_p", "top_k")
UNDERSTOOD = ("until", "max_new_tokens", "temperature", "do_sample", *PASSED_THROUGH, *SAMPLING_ONLY)


# ------------------------------------------------------------------------------------------------------------------
# Decoding settings of a request


@dataclass(frozen=True)
class Decoding:
    """How one group of requests is answered: what ``generate_batch`` gets, and the stop strings."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    options: tuple[tuple[str, object], ...] = ()  # generate kwargs, sorted (the dataclass is a grouping key)
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, gen_kwargs: dict | None, default_max_new_tokens: int) -> Decoding:
        """lmms-eval's generation kwargs -> settings. Temperature 0 (or none given) is greedy whatever ``do_sample``
        says; a positive temperature samples unless ``do_sample`` is false; ``top_p``/``top_k`` only apply when
        sampling."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until")
        if until is None:
            stop = ()
        elif isinstance(until, str):
            stop = (until,)
        elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
            stop = tuple(s for s in until if s)
        else:
            raise ValueError(f"generation kwarg 'until' must be a string or a list of strings, got {until!r}")
        max_new = kw.get("max_new_tokens", default_max_new_tokens)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise ValueError(f"generation kwarg 'max_new_tokens' must be a positive integer, got {max_new!r}")
        temperature = kw.get("temperature")
        temperature = None if temperature is None else float(temperature)
        options = sampling_kwargs(temperature, kw.get("do_sample"), *(kw.get(k) for k in SAMPLING_ONLY))
        options |= {k: kw[k] for k in PASSED_THROUGH if kw.get(k) is not None}
        ignored = tuple(sorted(k for k in kw if k not in UNDERSTOOD))
        return cls(max_new, stop, tuple(sorted(options.items())), ignored)

    @property
    def generate_kwargs(self) -> dict:
        return dict(self.options)


def generate(model, videos: dict[str, torch.Tensor] | None, prompts: list[str], decoding: Decoding) -> list[str]:
    """``model.generate_batch`` with the decoding settings, each row ending at its first stop string."""
    kwargs = decoding.generate_kwargs
    if decoding.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopStrings(model.tokenizer, decoding.stop)])
    texts = model.generate_batch(videos, prompts, decoding.max_new_tokens, **kwargs)
    return [cut_at_stop(t, decoding.stop) for t in texts]


# ------------------------------------------------------------------------------------------------------------------
# Prompts


def user_prompt(model, context: str) -> str:
    """The task's text as the user's turn of the checkpoint's prompt format, ready for the answer."""
    return model.get_prompt_builder().add_turn("human", context)


# ------------------------------------------------------------------------------------------------------------------
# Visuals


def _is_frame(item) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim in (3, 4))


def _frames_of(item) -> np.ndarray:
    """A PIL image or an array -> uint8 RGB frames ``[N, H, W, 3]``."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"))[None]
    frames = item if item.ndim == 4 else item[None]
    if frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB arrays [..., H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return frames


def visual_frames(visuals, counts: list[int], size: int) -> tuple[np.ndarray, dict[int, list[int]]] | None:
    """What ``doc_to_visual`` returned -> ``(frames, {frame count: positions})`` as ``read_frames`` gives them, or
    None when there is no visual (a text-only request).

    Accepted: one video file, folder of frames or image (a path); a clip of a video as ``{"path": ..., "time":
    [start_s, end_s], "end_frame": N}``; or images / frame arrays, taken as the frames of one video (each encoder
    samples its frames uniformly from them, as ``merv serve`` does with a list of ``image_url`` frames)."""
    items = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
    if not items:
        return None
    if all(_is_frame(v) for v in items):
        stacks = [_frames_of(v) for v in items]
        shape = short_side_size(stacks[0].shape[1], stacks[0].shape[2], size)  # all take the first frame's shape
        frames = np.concatenate([resize_to(s, shape) for s in stacks])
        return frames, {c: sample_frame_indices(len(frames), c) for c in sorted(set(counts))}
    if len(items) > 1:
        kinds = sorted({type(v).__name__ for v in items})
        raise ValueError(
            f"{len(items)} visuals ({', '.join(kinds)}): merv answers about one video (or one list of frames)"
        )
    item = items[0]
    clip = item if isinstance(item, dict) else {"path": item}
    path = clip.get("path", clip.get("video"))
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"unsupported visual {type(item).__name__}: give a path, a clip dict, images or frame arrays")
    time = tuple(clip["time"]) if clip.get("time") is not None else None
    return read_frames(Path(path), counts, size, time=time, end_frame=clip.get("end_frame"))


def request_videos(model, visuals, size: int) -> dict[str, torch.Tensor] | None:
    """Each encoder's transformed frames ``{encoder: [T_e, 3, S_e, S_e]}`` of a request's visuals (None: none)."""
    counts = [enc.num_frames for enc in model.encoders.values()]
    decoded = visual_frames(visuals, counts, size)
    if decoded is None:
        return None
    frames, positions = decoded
    return model.transform({name: frames[positions[enc.num_frames]] for name, enc in model.encoders.items()})


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------------------------------------------------


class MervLmms(lmms):
    """A merv checkpoint as an lmms-eval model (see the module docstring).

    ``model_args``: ``pretrained`` (a checkpoint folder, or a preset name for smoke tests), ``device`` (auto, cpu,
    cuda, cuda:N), ``dtype`` (auto, bf16, fp16, fp32; auto: bf16 on CUDA, fp32 on CPU), ``batch_size``,
    ``max_new_tokens`` (when a task gives none; default 512, as MERV), ``frame_size`` (short side frames are decoded
    at; default: what the encoders need, as ``merv serve``; give a shard set's size to decode at the size of the
    shards ``merv eval`` read). Under ``accelerate launch`` each process takes its share of the requests on its GPU.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 512,
        frame_size: int | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it for its automatic batch size, which merv has not
    ):
        super().__init__()
        from merv.api import load_vid
        from merv.data.transforms import frame_size as encoders_frame_size

        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(
                f"batch_size must be a positive integer, got {batch_size!r} (merv has no 'auto')"
            ) from None
        if self.batch_size < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # data parallel under accelerate launch: one GPU per process
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            if device in (None, "auto", "cuda"):
                device = f"cuda:{self.accelerator.local_process_index}"
        self.model = load_vid(pretrained, device=None if device in (None, "") else str(device), dtype=dtype)
        self.frame_size = int(frame_size) if frame_size else encoders_frame_size(self.model.cfg.encoders)
        self.pretrained = str(pretrained)
        self._warned: set[str] = set()
        log.info(
            "merv: %s on %s (%s), frames at short side %d, batch size %d",
            pretrained, self.model.device, self.model.dtype, self.frame_size, self.batch_size,
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer(self):
        return self.model.tokenizer

    # --------------------------------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id):
        return self.task_dict[task][split][doc_id]

    def _videos(self, doc_to_visual, doc_id, task: str, split: str) -> dict[str, torch.Tensor] | None:
        """The request's visuals, decoded and transformed; errors name the task, split and document."""
        where = f"task {task!r}, split {split!r}, doc {doc_id}"
        try:
            visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
            return request_videos(self.model, visuals, self.frame_size)
        except VideoError as e:
            raise ValueError(f"{where}: cannot read video {e.path}: {e.reason}") from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def _warn_ignored(self, decoding: Decoding) -> None:
        new = [k for k in decoding.ignored if k not in self._warned]
        if new:
            log.warning("merv: generation kwargs %s are not used (understood: %s)", new, list(UNDERSTOOD))
            self._warned.update(new)

    def generate_until(self, requests) -> list[str]:
        """Answers, in request order. Requests with equal generation settings are batched in the order they came;
        rows with and without a video are generated apart (a batch has visual tokens in every row or in none)."""
        from tqdm import tqdm

        groups: dict[Decoding, list[int]] = {}
        for i, req in enumerate(requests):
            decoding = Decoding.of(req.args[1], self.max_new_tokens)
            self._warn_ignored(decoding)
            groups.setdefault(decoding, []).append(i)
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="merv generate_until", disable=self.rank != 0)
        for decoding, indices in groups.items():
            for batch in _batches(indices, self.batch_size):
                rows = []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    rows.append((i, user_prompt(self.model, context), self._videos(doc_to_visual, doc_id, task, split)))
                for part in ([r for r in rows if r[2] is not None], [r for r in rows if r[2] is None]):
                    if not part:
                        continue
                    videos = None if part[0][2] is None else self._stack([r[2] for r in part])
                    texts = generate(self.model, videos, [r[1] for r in part], decoding)
                    for (i, _, _), text in zip(part, texts, strict=True):
                        answers[i] = text
                bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(negative log-probability, is greedy)`` per request, as lmms-eval's scoring reads it (the smaller, the
        likelier; see the module docstring). Requests of one document share its video: ``batch_size`` documents per
        forward pass, each decoded and encoded once."""
        from tqdm import tqdm

        from merv.eval.likelihood import continuation_logprobs

        docs: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            if len(req.args) < 6 or req.args[2] is None:
                raise NotImplementedError(
                    f"task {req.task_name!r}, doc {req.doc_id}: a log-likelihood without a video (e.g. the "
                    "unconditional terms of acc_mutual_info); merv scores continuations given a video only"
                )
            _, _, _, doc_id, task, split = req.args
            docs.setdefault((task, split, doc_id), []).append(i)
        scores: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="merv loglikelihood", disable=self.rank != 0)
        for batch in _batches(list(docs), self.batch_size):
            videos, contexts, continuations, index, order = [], [], [], [], []
            for j, key in enumerate(batch):
                first = requests[docs[key][0]].args
                task, split, doc_id = key
                video = self._videos(first[2], doc_id, task, split)
                if video is None:
                    raise NotImplementedError(
                        f"task {task!r}, doc {doc_id}: no visual; merv scores continuations given a video only"
                    )
                videos.append(video)
                for i in docs[key]:
                    prompt, continuation = answer_continuation(self.model.get_prompt_builder, *requests[i].args[:2])
                    contexts.append(prompt)
                    continuations.append(continuation)
                    index.append(j)
                    order.append(i)
            got = continuation_logprobs(self.model, self._stack(videos), contexts, continuations, video_index=index)
            for i, (logprob, greedy) in zip(order, got, strict=True):
                scores[i] = (-logprob, greedy)
            bar.update(len(order))
        bar.close()
        return scores

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "merv's lmms-eval model answers generate_until and loglikelihood requests; multi-round tasks "
            "(generate_until_multi_round) are not supported"
        )

    def _stack(self, videos: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {name: torch.stack([v[name] for v in videos]) for name in self.model.encoders}
