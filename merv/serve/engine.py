"""The generation worker: requests wait in a queue; the worker takes those pending (up to ``max_batch``, waiting
``batch_wait_ms`` for company), groups them by sampling settings, and serves each group with one
``model.generate_batch`` call in a worker thread, so the event loop keeps accepting requests meanwhile.

Each row of a batch ends on its own (EOS, its own ``max_tokens``, one of its stop strings, or its client gone):
:class:`RowTracker` is a stopping criterion that sees every new token, records each row's tokens and streams its new
text. A finished row only idles (HF pads it) until the batch's longest row ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from merv.decoding import sampling_kwargs, visible_text

log = logging.getLogger("merv.serve")


@dataclass(frozen=True)
class Sampling:
    """Settings that must be equal across one ``generate`` call (temperature 0 = greedy)."""

    temperature: float
    top_p: float

    def generate_kwargs(self) -> dict:
        # OpenAI's sampling has no top-k: transformers' default (50) is turned off
        return sampling_kwargs(self.temperature, top_p=self.top_p, top_k=0)

    def key(self) -> tuple:
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


@dataclass
class Result:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass
class Job:
    """One request's work: transformed videos ``{encoder: [T, 3, S, S]}``, the prompt, and how to answer."""

    videos: dict[str, torch.Tensor]
    prompt: str
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: asyncio.Queue | None = None  # streaming: text deltas, then the Result (or an exception)
    future: asyncio.Future | None = None  # non-streaming: the Result
    cancelled: bool = False  # set when a streaming client goes away: its row stops at the next token
    loop: asyncio.AbstractEventLoop | None = None


class RowTracker(StoppingCriteria):
    """Follows each row of a ``generate`` call: its tokens, its end, its streamed text."""

    def __init__(self, tokenizer, jobs: list[Job]):
        self.tokenizer = tokenizer
        self.jobs = jobs
        self.eos = tokenizer.eos_token_id
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = ["" for _ in jobs]
        self.finish: list[str | None] = [None for _ in jobs]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()  # with inputs_embeds, input_ids holds only the generated tokens
        for i, (job, token) in enumerate(zip(self.jobs, last, strict=True)):
            if self.finish[i] is not None:
                continue
            self.tokens[i].append(token)
            if token == self.eos:
                self.finish[i] = "stop"
                continue
            text, stopped = visible_text(self.decode(i), job.stop, final=False)
            if stopped:
                self.finish[i] = "stop"
            elif job.cancelled:
                self.finish[i] = "cancelled"
            elif len(self.tokens[i]) >= job.max_tokens:
                self.finish[i] = "length"
            if job.stream is not None and self.finish[i] is None:
                self.send(i, text)
        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)

    def decode(self, i: int) -> str:
        ids = [t for t in self.tokens[i] if t != self.eos]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def send(self, i: int, text: str) -> None:
        """Stream the new part of row ``i``'s visible text (only ever appending to what was sent)."""
        if text.startswith(self.sent[i]) and len(text) > len(self.sent[i]):
            job = self.jobs[i]
            job.loop.call_soon_threadsafe(job.stream.put_nowait, text[len(self.sent[i]) :])
            self.sent[i] = text

    def results(self) -> list[Result]:
        out = []
        for i, job in enumerate(self.jobs):
            text, stopped = visible_text(self.decode(i), job.stop, final=True)
            reason = self.finish[i] or "length"  # a row never marked ended ran into max_new_tokens
            if job.stream is not None and text.startswith(self.sent[i]):
                self.send(i, text)
            out.append(Result(text, len(self.tokens[i]), "stop" if stopped else reason))
        return out


@dataclass
class Stats:
    """What the server did, for ``/health`` (tests check batching with it)."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    busy_s: float = 0.0

    def record(self, size: int, seconds: float) -> None:
        self.requests += size
        self.batches += 1
        self.largest_batch = max(self.largest_batch, size)
        self.batch_sizes[size] += 1
        self.busy_s += seconds

    def to_dict(self) -> dict:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "busy_s": round(self.busy_s, 3),
        }


class BatchEngine:
    """Queue + one worker task; generation itself runs in a single worker thread (the model is not thread-safe)."""

    def __init__(self, model, max_batch: int, batch_wait_ms: float):
        self.model = model
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.stats = Stats()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merv-generate")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job) -> None:
        job.loop = asyncio.get_running_loop()
        self.queue.put_nowait(job)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.collect()
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.sampling.key(), []).append(job)
            for jobs in groups.values():
                await loop.run_in_executor(self.executor, self.generate, jobs)

    async def collect(self) -> list[Job]:
        """The next batch: everything pending (up to ``max_batch``), after waiting briefly for more to arrive."""
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.batch_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                break
        return [job for job in batch if not job.cancelled]

    def generate(self, jobs: list[Job]) -> None:
        """Serve one group with a single ``generate_batch`` call (in the worker thread); deliver each result."""
        if not jobs:
            return
        start = time.perf_counter()
        tracker = RowTracker(self.model.tokenizer, jobs)
        try:
            videos = {name: torch.stack([job.videos[name] for job in jobs]) for name in jobs[0].videos}
            self.model.generate_batch(
                videos,
                [job.prompt for job in jobs],
                max_new_tokens=max(job.max_tokens for job in jobs),
                stopping_criteria=StoppingCriteriaList([tracker]),
                **jobs[0].sampling.generate_kwargs(),
            )
            outcomes: list[Result | BaseException] = list(tracker.results())
        except Exception as e:  # one failed batch fails its requests, not the server
            log.exception("generation failed for a batch of %d", len(jobs))
            outcomes = [e] * len(jobs)
        seconds = time.perf_counter() - start
        self.stats.record(len(jobs), seconds)
        log.info("batch of %d (%d streaming) in %.2f s", len(jobs), sum(j.stream is not None for j in jobs), seconds)
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.loop.call_soon_threadsafe(deliver, job, outcome)


def deliver(job: Job, outcome: Result | BaseException) -> None:
    """Hand a finished row to its request (on the event loop)."""
    if job.stream is not None:
        job.stream.put_nowait(outcome)
    elif job.future is not None and not job.future.done():
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
