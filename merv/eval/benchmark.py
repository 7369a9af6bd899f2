"""Evaluate a checkpoint on one sharded benchmark (or one chunk of it): answer, score, judge, record provenance.

Steps, each resumable through the cache (merv.eval.cache):

1. read the chunk's questions from the shards (metadata and a hash of the stored frames; nothing decoded);
2. compute each answer's content key; only the misses load the model and run it, batch by batch, and every
   batch is stored as soon as it is done -- multiple choice by greedy generation and/or by likelihood (every option
   letter scored in one forward pass), open-ended by greedy generation;
3. open-ended answers go to the LLM judge when one is configured (verdicts stored as they arrive);
4. the rows, their summary (merv.eval.metrics) and the manifest make the result file.

A result holds its chunk's rows; ``merv merge`` (merv.eval.merge) joins chunks with an exactly-once check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from merv.config import fingerprint
from merv.eval.cache import ResultCache, content_key
from merv.eval.metrics import degenerate_kinds, first_char_letter, normalise, summarise
from merv.eval.provenance import frame_sampling, git_commit, package_versions, weights_provenance
from merv.eval.registry import BenchmarkSpec, check_question, lookup
from merv.prompting import MCQ_INSTRUCTION, PromptBuilder, mcq_prompt, option_letters

log = logging.getLogger(__name__)
RESULT_FORMAT = "merv-eval-result/1"
McqMode = Literal["generate", "likelihood", "both"]
LETTER_RULE = "first character of the stripped prediction, either case (MERV)"


@dataclass(frozen=True)
class EvalSettings:
    """How a benchmark is evaluated (what its numbers depend on, except the chunking)."""

    mcq: McqMode = "both"
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the benchmark's registry default
    num_chunks: int = 1
    chunk_index: int = 0
    limit: int | None = None  # only the first N questions of the benchmark (a quick look)

    def __post_init__(self):
        if self.mcq not in ("generate", "likelihood", "both"):
            raise ValueError(f"--mcq must be generate, likelihood or both, got {self.mcq!r}")
        if self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if not 0 <= self.chunk_index < self.num_chunks:
            raise ValueError(f"--chunk-index {self.chunk_index} must be in [0, --num-chunks {self.num_chunks})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


# ------------------------------------------------------------------------------------------------------------------
# The model, loaded only when an answer is missing from the cache


class CheckpointHandle:
    """A checkpoint folder: its identity and prompt format at once, the model itself on first use.

    The identity (what every cached answer is keyed by) is computed from the files the model loads, never copied:
    the model config as ``config.json`` says now (checked against the config the weights were trained with), the
    SHA-256 of the checkpoint's weights, and the digest of every frozen weight the config resolves to -- each
    encoder's file or folder and the LLM's folder with its tokenizer -- wherever they are found ($MERV_WEIGHTS
    first). Digests of unchanged files come from ``memo`` (see :mod:`merv.digests`).
    """

    def __init__(self, path: str | Path, device: str | None = None, dtype: str | None = None, memo=None):
        from merv.checkpoint import WEIGHTS, read_meta
        from merv.config import load_run_config
        from merv.digests import DigestMemo
        from merv.integrity import check_checkpoint_config
        from merv.runtime import dtype_name, resolve_device, resolve_dtype
        from merv.weights import checkpoint_roots, weight_paths

        self.path = Path(path)
        self.meta = read_meta(self.path)
        config = json.loads((self.path / "config.json").read_text())
        self.model_cfg = load_run_config(self.path / "config.json").model
        if not check_checkpoint_config(self.path, config, self.meta):
            log.warning("%s records no training config (an older checkpoint): config.json is used as it is", path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.dtype_name = dtype_name(self.dtype)
        memo = memo if memo is not None else DigestMemo(None)
        self.weights = weights_provenance(weight_paths(self.model_cfg, checkpoint_roots(self.path, self.meta)), memo)
        self.identity = {
            "config": fingerprint(config.get("model")),
            "weights_sha256": memo.file(self.path / WEIGHTS),
            "frozen_weights": {part: w["sha256"] for part, w in self.weights.items()},
        }
        memo.save()
        self._model = None
        self._tokenizer = None
        self.calls, self.loads = {"generate": 0, "likelihood": 0}, 0

    @classmethod
    def of_model(cls, model, identity: dict) -> CheckpointHandle:
        """A handle on a model already in memory (tests, notebooks); ``identity`` names it in cache keys."""
        from merv.runtime import dtype_name

        handle = cls.__new__(cls)
        handle.path, handle.meta, handle.model_cfg, handle.weights = None, {}, model.cfg, {}
        handle.device, handle.dtype, handle.dtype_name = model.device, model.dtype, dtype_name(model.dtype)
        handle.identity = dict(identity)
        handle._model, handle._tokenizer = model.eval(), model.tokenizer
        handle.calls, handle.loads = {"generate": 0, "likelihood": 0}, 0
        return handle

    @property
    def model(self):
        if self._model is None:
            from merv.checkpoint import load_checkpoint

            log.info("loading %s on %s (%s)", self.path, self.device, self.dtype_name)
            model, _, _ = load_checkpoint(self.path, dtype=self.dtype)
            self._model = model.place(self.device, self.dtype).eval()
            self._tokenizer = self._model.tokenizer
            self.loads += 1
        return self._model

    def prompt_builder(self) -> PromptBuilder:
        fmt = self.model_cfg.llm.prompt_format
        if fmt == "chat-template" and self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_cfg.llm.weights)
        return PromptBuilder(fmt, self._tokenizer)


# ------------------------------------------------------------------------------------------------------------------
# Questions


@dataclass
class Question:
    record: dict  # the shard sample's metadata: question fields, answer, frame positions, key
    frames_sha256: str  # of the stored frames, as stored (so a re-shard with other frames misses the cache)

    @property
    def id(self):
        return self.record["question_id"]


def _raw_samples(shard_dir: Path):
    import webdataset as wds

    from merv.data.shards import shard_urls

    yield from wds.DataPipeline(wds.SimpleShardList(shard_urls(shard_dir)), wds.tarfile_to_samples())


def read_questions(shard_dir: Path, hash_range: tuple[int, int] | None = None) -> list[Question]:
    """Every question of a sharded benchmark in stored order, without decoding frames. The stored frames of the
    questions in ``hash_range`` (default: all) are hashed for the cache keys; the others get ``frames_sha256=""``."""
    lo, hi = hash_range or (0, float("inf"))
    questions = []
    for i, raw in enumerate(_raw_samples(shard_dir)):
        h = hashlib.sha256()
        if lo <= i < hi:
            for name in sorted(k for k in raw if not k.startswith("__") and k != "json"):
                h.update(name.encode() + b"\0" + raw[name])
        questions.append(Question(json.loads(raw["json"]), h.hexdigest() if lo <= i < hi else ""))
    return questions


def chunk_bounds(n: int, num_chunks: int, index: int) -> tuple[int, int]:
    """Questions ``[lo, hi)`` of chunk ``index``: chunks of ceil(n / num_chunks) in benchmark order (MERV's split)."""
    size = math.ceil(n / num_chunks) if n else 0
    return min(n, index * size), min(n, (index + 1) * size)


def ids_digest(ids: list) -> str:
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# Prompts


def question_prompt(handle: CheckpointHandle, spec: BenchmarkSpec, record: dict) -> str:
    builder = handle.prompt_builder()
    if spec.kind == "mcq":
        builder.add_turn("human", mcq_prompt(record["question"], record["options"]))
    else:
        builder.add_turn("human", f"{record['question']} {spec.prompt_suffix}".strip())
    return builder.get_prompt()


def letter_continuations(handle: CheckpointHandle, prompt_message: str, num_options: int) -> list[str]:
    """Each option letter as the prompt format writes the start of an answer (``" A"`` after ``Out:``), cut after the
    letter so chat templates' end-of-turn text is not scored."""
    out = []
    for letter in option_letters(num_options):
        builder = handle.prompt_builder()
        prompt = builder.add_turn("human", prompt_message)
        full = builder.add_turn("gpt", letter)
        start = len(prompt)
        out.append(full[start : full.index(letter, start) + 1])
    return out


# ------------------------------------------------------------------------------------------------------------------
# Running the model on cache misses


@dataclass
class _Job:
    question: Question
    prompt: str
    gen_key: str | None  # set when the generation is missing
    ll_key: str | None  # set when the likelihood scores are missing
    continuations: list[str] | None = None


class NonFiniteScore(ValueError):
    """The model scored an option NaN or infinite: its outputs are broken, so no accuracy can be computed."""


def _finite_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def generation_problem(value) -> str | None:
    """What is wrong with a cached generation (``{"prediction": str}``), or None."""
    if not isinstance(value, dict) or set(value) != {"prediction"} or not isinstance(value["prediction"], str):
        return f"a generation must be {{'prediction': <text>}}, got {str(value)[:80]}"
    return None


def likelihood_check(num_options: int):
    """A check of cached option scores: one finite log-probability and one greedy flag per option."""

    def problem(value) -> str | None:
        if not isinstance(value, dict) or set(value) != {"logprobs", "greedy"}:
            return f"option scores must be {{'logprobs', 'greedy'}}, got {str(value)[:80]}"
        logprobs, greedy = value["logprobs"], value["greedy"]
        if not isinstance(logprobs, list) or len(logprobs) != num_options or not all(map(_finite_number, logprobs)):
            return f"need {num_options} finite log-probabilities, got {str(logprobs)[:80]}"
        if not isinstance(greedy, list) or len(greedy) != num_options or not all(isinstance(g, bool) for g in greedy):
            return f"need {num_options} greedy flags, got {str(greedy)[:80]}"
        return None

    return problem


def verdict_problem(value) -> str | None:
    """What is wrong with a cached judge verdict (``{"pred": yes|no, "score": 0..5, "served_model": str}``)."""
    if not isinstance(value, dict) or value.get("pred") not in ("yes", "no"):
        return f"a verdict needs 'pred' yes or no, got {str(value)[:80]}"
    score = value.get("score")
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5:
        return f"a verdict needs an integer 'score' from 0 to 5, got {score!r}"
    if not isinstance(value.get("served_model"), str):
        return "a verdict needs the 'served_model' that gave it"
    return None


def _run_model(handle, shard_dir: Path, jobs: list[_Job], batch_size: int, max_new_tokens: int, cache) -> None:
    """Decode only the samples of ``jobs``, answer them batch by batch, store each batch at once."""
    from merv.data.batching import encoder_frames
    from merv.data.shards import decode_sample
    from merv.eval.likelihood import continuation_logprobs

    model = handle.model
    by_key = {j.question.record["key"]: j for j in jobs}
    done = 0

    def flush(batch: list[tuple[_Job, dict]]) -> None:
        nonlocal done
        stored = {}
        gen = [(j, v) for j, v in batch if j.gen_key]
        if gen:
            videos = {n: torch.stack([v[n] for _, v in gen]) for n in model.encoders}
            texts = model.generate_batch(videos, [j.prompt for j, _ in gen], max_new_tokens)
            handle.calls["generate"] += 1
            stored |= {j.gen_key: {"prediction": t} for (j, _), t in zip(gen, texts, strict=True)}
        scored = [(j, v) for j, v in batch if j.ll_key]
        if scored:
            videos = {n: torch.stack([v[n] for _, v in scored]) for n in model.encoders}
            contexts, continuations, index = [], [], []
            for i, (j, _) in enumerate(scored):
                contexts += [j.prompt] * len(j.continuations)
                continuations += j.continuations
                index += [i] * len(j.continuations)
            scores = continuation_logprobs(model, videos, contexts, continuations, video_index=index)
            handle.calls["likelihood"] += 1
            pos = 0
            for j, _ in scored:
                mine = scores[pos : pos + len(j.continuations)]
                pos += len(j.continuations)
                bad = [(option_letters(len(mine))[i], s) for i, (s, _) in enumerate(mine) if not math.isfinite(s)]
                if bad:  # nothing of this batch is stored: a later run asks the model again
                    raise NonFiniteScore(
                        f"{shard_dir}: question {j.question.id!r}: non-finite log-probability "
                        f"{', '.join(f'{letter}={s}' for letter, s in bad)}: the model's outputs are not finite "
                        f"(overflow in {handle.dtype_name}, or broken weights); no accuracy is written"
                    )
                stored[j.ll_key] = {"logprobs": [s for s, _ in mine], "greedy": [g for _, g in mine]}
        cache.put_many(stored)
        done += len(batch)
        log.info("answered %d/%d questions", done, len(jobs))

    batch: list[tuple[_Job, dict]] = []
    for raw in _raw_samples(shard_dir):
        job = by_key.get(raw["__key__"])
        if job is None:
            continue
        batch.append((job, encoder_frames(model, decode_sample(raw))))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if done != len(jobs):
        raise RuntimeError(f"{shard_dir}: {len(jobs) - done} questions vanished from the shards while evaluating")


# ------------------------------------------------------------------------------------------------------------------
# Rows


def _row(spec: BenchmarkSpec, q: Question, gen: dict | None, ll: dict | None) -> dict:
    rec = q.record
    row = {"question_id": q.id}
    if rec.get("question_type") is not None:
        row["question_type"] = rec["question_type"]
    if spec.kind == "mcq":
        n = len(rec["options"])
        letters = option_letters(n)
        answer = letters[rec[spec.answer_field]]
        row |= {"answer": answer, "answer_text": rec["options"][rec[spec.answer_field]], "num_options": n}
        if gen is not None:
            letter = first_char_letter(gen["prediction"])
            row |= {"prediction": gen["prediction"], "letter": letter, "correct_generate": letter == answer}
            row["degenerate"] = degenerate_kinds(gen["prediction"], n)
        if ll is not None:
            choice = letters[max(range(n), key=lambda i: ll["logprobs"][i])]
            row["likelihood"] = {**ll, "choice": choice, "correct": choice == answer}
    else:
        answer = str(rec[spec.answer_field])
        row |= {"answer": answer, "prediction": gen["prediction"]}
        row["exact_match"] = normalise(gen["prediction"]) == normalise(answer)
        row["degenerate"] = degenerate_kinds(gen["prediction"])
    return row


def _judge_rows(spec: BenchmarkSpec, questions: list[Question], rows: list[dict], judge, cache) -> None:
    """Attach a verdict (or the reason there is none) to every open-ended row; new verdicts are stored on arrival."""
    fixed = judge.verdict_key_fields()
    keys, todo, asked = [], [], set()
    for q, row in zip(questions, rows, strict=True):
        item = {"question": q.record["question"], "answer": row["answer"], "prediction": row["prediction"]}
        key = content_key("verdict", {**fixed, **item})
        if cache.get(key, verdict_problem) is None and key not in asked:  # identical triples are asked once
            todo.append((key, {**item, "id": q.id}))
            asked.add(key)
        keys.append(key)
    fresh: dict[str, dict] = {}

    def on_verdict(key: str, verdict: dict) -> None:
        fresh[key] = verdict
        if "unjudged" not in verdict:  # an unjudged question is asked again by the next run
            cache.put(key, verdict)

    if todo:
        log.info("judging %d answers with %s (%d cached)", len(todo), judge.model, len(rows) - len(todo))
        try:
            judge.judge_all(todo, on_verdict)
        finally:
            log.info("judge: %d requests, retries %s, %d verdicts stored", judge.requests, judge.retries, len(fresh))
    for key, row in zip(keys, rows, strict=True):
        verdict = fresh.get(key) or cache.get(key, verdict_problem)
        if "unjudged" in verdict:
            row["unjudged"] = verdict["unjudged"]
        else:
            row["verdict"] = verdict


# ------------------------------------------------------------------------------------------------------------------


def _plan(handle, spec: BenchmarkSpec, questions: list[Question], modes: set[str], decoding: dict, cache):
    """Cache keys of every question's answers, and the jobs (questions with an answer missing from the cache)."""
    jobs, keys = [], []
    for q in questions:
        prompt = question_prompt(handle, spec, q.record)
        # the question as the model sees it (its text and options; the frames by digest), never just its id
        question = {"question": q.record.get("question"), "options": q.record.get("options"),
                    "time": q.record.get("time"), "end_frame": q.record.get("end_frame")}  # fmt: skip
        base = {"checkpoint": handle.identity, "frames": q.frames_sha256, "positions": q.record.get("frame_positions"),
                "question": question, "prompt": prompt, "dtype": decoding["dtype"],
                "device": decoding["device"]}  # fmt: skip
        gen_key = ll_key = conts = None
        if "generate" in modes:
            gen_key = content_key("generate", {**base, "max_new_tokens": decoding["max_new_tokens"]})
        if "likelihood" in modes:
            message = mcq_prompt(q.record["question"], q.record["options"])
            conts = letter_continuations(handle, message, len(q.record["options"]))
            ll_key = content_key("likelihood", {**base, "continuations": conts})
        keys.append((gen_key, ll_key))
        missing = [
            gen_key if gen_key and cache.get(gen_key, generation_problem) is None else None,
            ll_key if ll_key and cache.get(ll_key, likelihood_check(len(conts))) is None else None,
        ]
        if any(missing):
            jobs.append(_Job(q, prompt, *missing, conts))
    return keys, jobs


def _manifest(handle, spec: BenchmarkSpec, shard_manifest: dict, decoding: dict, batch_size: int, modes, judge_info):
    mcq = spec.kind == "mcq"
    return {
        "checkpoint": {**handle.identity, "path": str(handle.path) if handle.path else None,
                       "stage": handle.meta.get("stage"), "step": handle.meta.get("step"),
                       "model": handle.model_cfg.name},
        "weights": handle.weights,
        "frames": frame_sampling(handle.model_cfg, shard_manifest),
        "decoding": {**decoding, "batch_size": batch_size, "mcq": sorted(modes) if mcq else None,
                     "mcq_letter_rule": LETTER_RULE if mcq else None,
                     "likelihood_continuation": "the option letter" if "likelihood" in modes else None},
        "prompt": {"format": handle.model_cfg.llm.prompt_format, "suffix": spec.prompt_suffix,
                   "mcq_instruction": MCQ_INSTRUCTION if mcq else None},
        "judge": judge_info,
        "packages": package_versions(),
        "git_commit": git_commit(),
    }  # fmt: skip


def evaluate(
    handle: CheckpointHandle,
    shard_dir: str | Path,
    name: str,
    settings: EvalSettings = EvalSettings(),
    cache: ResultCache | None = None,
    judge=None,
) -> dict:
    """Evaluate one chunk of a sharded benchmark; returns the result (rows, summary, manifest)."""
    from merv.data.shards import read_manifest

    start = time.time()
    shard_dir = Path(shard_dir)
    cache = cache if cache is not None else ResultCache(None)
    shard_manifest = read_manifest(shard_dir)
    total = min(shard_manifest["samples"], settings.limit or shard_manifest["samples"])
    lo, hi = chunk_bounds(total, settings.num_chunks, settings.chunk_index)
    stored = read_questions(shard_dir, (lo, hi))
    if len(stored) != shard_manifest["samples"]:
        raise ValueError(f"{shard_dir}: manifest.json lists {shard_manifest['samples']} samples, the shards hold "
                         f"{len(stored)}: reshard the benchmark")  # fmt: skip
    benchmark = stored[:total]
    if not benchmark:
        raise ValueError(f"{shard_dir}: benchmark {name!r} has no questions")
    spec = lookup(name, benchmark[0].record)
    questions = benchmark[lo:hi]
    for q in questions:
        check_question(spec, q.record)
    if spec.kind == "open":
        modes = {"generate"}
    else:
        modes = {"generate", "likelihood"} if settings.mcq == "both" else {settings.mcq}
    decoding = {"max_new_tokens": settings.max_new_tokens or spec.max_new_tokens, "greedy": True,
                "dtype": handle.dtype_name, "device": handle.device.type}  # fmt: skip

    # answers: from the cache, the misses from the model (stored batch by batch)
    keys, jobs = _plan(handle, spec, questions, modes, decoding, cache)
    if jobs:
        log.info("%s: %d of %d questions need the model", name, len(jobs), len(questions))
        _run_model(handle, shard_dir, jobs, settings.batch_size, decoding["max_new_tokens"], cache)
    rows = []
    for q, (g, x) in zip(questions, keys, strict=True):
        gen = cache.get(g, generation_problem) if g else None
        scores = cache.get(x, likelihood_check(len(q.record["options"]))) if x else None
        if (g and gen is None) or (x and scores is None):
            raise RuntimeError(f"{name}: question {q.id!r}: an answer vanished from the cache while evaluating")
        rows.append(_row(spec, q, gen, scores))
    judge_info = None
    if spec.kind == "open" and judge is not None:
        _judge_rows(spec, questions, rows, judge, cache)
        judge_info = judge.describe()
        judge_info["served_models"] = sorted({r["verdict"]["served_model"] for r in rows if r.get("verdict")})

    determined_by = {
        "checkpoint": handle.identity,
        "shards": shard_manifest.get("fingerprint"),
        "spec": spec.to_dict(),
        "modes": sorted(modes),
        "decoding": decoding,
        "limit": settings.limit,
        "judge": {k: v for k, v in judge_info.items() if k not in ("url", "served_models", "prompt_file")}
        if judge_info
        else None,  # where the judge and its prompt file are does not matter: its wording's sha256 does
    }
    return {
        "format": RESULT_FORMAT,
        "benchmark": name,
        "spec": spec.to_dict(),
        "chunk": {"index": settings.chunk_index, "count": settings.num_chunks},
        "questions": {
            "total": len(benchmark),
            "ids_sha256": ids_digest([q.id for q in benchmark]),
            "limit": settings.limit,
            "in_benchmark": shard_manifest.get("input"),
            "quarantined_at_sharding": shard_manifest.get("bad"),
        },
        "config_fingerprint": fingerprint(determined_by),
        "summary": summarise(rows, spec.kind),
        "manifest": _manifest(handle, spec, shard_manifest, decoding, settings.batch_size, modes, judge_info),
        "run": {
            "seconds": round(time.time() - start, 2),
            "model_loads": handle.loads,
            "model_calls": dict(handle.calls),
            "answered_by_model": len(jobs),
            "cache_writes": cache.writes,
            "judge_requests": judge.requests if judge is not None else 0,
            "judge_retries": dict(judge.retries) if judge is not None else {},
        },
        "benchmark_ids": [q.id for q in benchmark],
        "assigned": [q.id for q in questions],
        "rows": rows,
    }
