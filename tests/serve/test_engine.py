"""The batching worker in-process: rows that end on their own, streamed text, grouping by sampling settings."""

from __future__ import annotations

import asyncio

import pytest
import torch

from merv.serve.engine import BatchEngine, Job, RowTracker, Sampling, visible_text

GREEDY = Sampling(temperature=0, top_p=1)


@pytest.mark.parametrize(
    ("text", "stop", "final", "expected"),
    [
        (" The red circ", ("circle",), False, ("The red", False)),  # the start of a stop string is held back
        (" The red circle moves", ("circle",), False, ("The red", True)),
        (" The red  ", (), False, ("The red", False)),  # trailing space: maybe inside the answer, maybe stripped
        (" The red  ", (), True, ("The red", False)),
        ("caf\ufffd", (), False, ("caf", False)),  # half a UTF-8 character
        ("a.b", (".", "b"), False, ("a", True)),  # the earliest stop string wins
    ],
)
def test_visible_text(text, stop, final, expected):
    assert visible_text(text, stop, final) == expected


def video_batch(model, n: int) -> list[dict]:
    torch.manual_seed(1)
    return [
        {name: torch.randn(enc.num_frames, 3, enc.image_size, enc.image_size) for name, enc in model.encoders.items()}
        for _ in range(n)
    ]


def test_rows_end_on_their_own_and_stream(tiny_model):
    tok = tiny_model.tokenizer
    words = tok(" The red circle moves left", add_special_tokens=False)["input_ids"]
    the_red = len(tok(" The red", add_special_tokens=False)["input_ids"])
    assert words[:the_red] == tok(" The red", add_special_tokens=False)["input_ids"]

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [
            Job({}, "", max_tokens=50, sampling=GREEDY, loop=loop),
            Job({}, "", max_tokens=the_red, sampling=GREEDY, loop=loop),
            Job({}, "", max_tokens=50, sampling=GREEDY, stop=("circle",), stream=asyncio.Queue(), loop=loop),
        ]
        tracker = RowTracker(tok, jobs)
        rows = [words[:the_red] + [tok.eos_token_id], words, words]
        done = []
        for step in range(len(words)):
            ids = torch.tensor([(r + [tok.pad_token_id] * len(words))[: step + 1] for r in rows])
            done.append(await asyncio.to_thread(tracker, ids, None))
        await asyncio.sleep(0)  # let the streamed deltas land
        deltas = []
        while not jobs[2].stream.empty():
            deltas.append(jobs[2].stream.get_nowait())
        return tracker.results(), done, deltas

    results, done, deltas = asyncio.run(run())
    assert [(r.text, r.finish_reason) for r in results] == [
        ("The red", "stop"),
        ("The red", "length"),
        ("The red", "stop"),
    ]
    assert [r.completion_tokens for r in results][:2] == [the_red + 1, the_red]  # EOS counted: the model made it
    assert done[the_red - 1].tolist() == [False, True, False] and done[the_red].tolist()[:2] == [True, True]
    assert "".join(deltas) == "The red" and len(deltas) >= 2


def test_engine_batches_and_groups_by_sampling(tiny_model):
    """Pending requests share one generate call per sampling setting; greedy answers do not depend on the batch."""
    builder = tiny_model.get_prompt_builder()
    builder.add_turn("human", "What colour is the moving shape?")
    long_prompt = builder.get_prompt()
    videos = video_batch(tiny_model, 3)

    async def run(specs):
        engine = BatchEngine(tiny_model, max_batch=8, batch_wait_ms=50)
        engine.start()
        loop = asyncio.get_running_loop()
        jobs = []
        for video, prompt, sampling in specs:
            job = Job(video, prompt, max_tokens=6, sampling=sampling, future=loop.create_future())
            engine.submit(job)
            jobs.append(job)
        results = await asyncio.gather(*(job.future for job in jobs))
        await engine.stop()
        return results, engine.stats

    hot = Sampling(temperature=0.7, top_p=0.9)
    specs = [(videos[0], long_prompt, GREEDY), (videos[1], "In: Hi\nOut:", GREEDY), (videos[2], long_prompt, hot)]
    results, stats = asyncio.run(run(specs))
    assert stats.batch_sizes == {2: 1, 1: 1} and stats.requests == 3
    assert all(r.completion_tokens >= 1 for r in results)
    alone, _ = asyncio.run(run(specs[1:2]))  # left padding in the batch must not change a greedy answer
    assert alone[0].text == results[1].text and alone[0].completion_tokens == results[1].completion_tokens
