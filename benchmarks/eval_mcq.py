"""Multiple choice by generation vs by likelihood (issue 10), on the synthetic benchmark, from one run:

1. how often the two protocols pick the same option (generation: MERV's first-character letter; likelihood: the
   option letter with the highest log-probability, all options of a question in one forward pass);
2. their accuracies, and how often generation gives no option letter at all;
3. speed: questions/s of each on the same decoded questions and model, and the ratio likelihood / generation,
   one question at a time and at the pipeline's batch size.

Both are measured on the trained checkpoint (answers a letter, then stops) and on the same run's align checkpoint,
whose LLM is still untrained (it answers with whatever it likes, until max_new_tokens).

    python benchmarks/eval_mcq.py                       # trains merv_tiny on the synthetic data first (minutes)
    python benchmarks/eval_mcq.py --model results/merv_tiny/finetune --data data/shards/eval/synth_mcq

Without --model, the real pipeline (Snakemake, this repository's Snakefile) renders the synthetic dataset, builds the
tiny weights, shards and trains merv_tiny in a work folder, exactly as `make demo` does but with fewer clips.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def train_tiny(work: Path, train_videos: int, eval_videos: int, epochs: int) -> tuple[Path, Path]:
    """Run the pipeline up to the finetuned checkpoint and the sharded MCQ benchmark; returns both paths."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["synth"].update(train_videos=train_videos, eval_videos=eval_videos)
    cfg["models"]["merv_tiny"]["overrides"] = {"train": {"stages": {"finetune": {"epochs": epochs}}}}
    (work / "config").mkdir(parents=True, exist_ok=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    targets = ["results/merv_tiny/finetune", "data/shards/eval/synth_mcq"]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work)]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    print(f"training merv_tiny on {train_videos} synthetic clips ({epochs} finetune epochs) in {work} ...", flush=True)
    subprocess.run([*cmd, "--cores", str(os.cpu_count() or 2), *targets], check=True, env=env)
    return work / targets[0], work / targets[1]


def load_questions(handle, data: Path, limit: int | None):
    """Decoded, transformed questions in memory, so the timings below measure the model only."""
    from merv.data.batching import encoder_frames
    from merv.data.benchmarks import lookup
    from merv.data.shards import iter_samples
    from merv.decoding import letter_continuations
    from merv.eval.benchmark import question_prompt
    from merv.prompting import mcq_prompt, option_letters

    spec = lookup("synth_mcq")
    out = []
    for sample in iter_samples(data):
        rec = sample["meta"]
        out.append(
            {
                "videos": encoder_frames(handle.model, sample),
                "prompt": question_prompt(handle, spec, rec),
                "continuations": letter_continuations(
                    handle.prompt_builder, mcq_prompt(rec["question"], rec["options"]), len(rec["options"])
                ),
                "answer": option_letters(len(rec["options"]))[rec["answer_id"]],
            }
        )
        if limit and len(out) == limit:
            break
    return out


def by_generation(model, batch, max_new_tokens: int) -> list[str]:
    """MERV's protocol on one batch: greedy answers, scored by their first character."""
    from merv.eval.metrics import first_char_letter

    videos = {n: torch.stack([q["videos"][n] for q in batch]) for n in model.encoders}
    return [first_char_letter(t) for t in model.generate_batch(videos, [q["prompt"] for q in batch], max_new_tokens)]


def by_likelihood(model, batch) -> list[str]:
    """The likelihood protocol on one batch: the option letter with the highest log-probability."""
    from merv.eval.likelihood import continuation_logprobs
    from merv.prompting import option_letters

    videos = {n: torch.stack([q["videos"][n] for q in batch]) for n in model.encoders}
    contexts, conts, index = [], [], []
    for j, q in enumerate(batch):
        contexts += [q["prompt"]] * len(q["continuations"])
        conts += q["continuations"]
        index += [j] * len(q["continuations"])
    scores = iter(s for s, _ in continuation_logprobs(model, videos, contexts, conts, video_index=index))
    letters = []
    for q in batch:
        mine = [next(scores) for _ in q["continuations"]]
        letters.append(option_letters(len(mine))[mine.index(max(mine))])
    return letters


def speed_report(name: str, model, questions, batch_size: int, max_new_tokens: int, repeats: int):
    """Questions/s of both protocols at one batch size; returns the letters of each.

    Each batch is timed with both protocols back to back, ``repeats`` times, and its fastest time counts (other
    processes on the machine only ever add time): the two see the same load, batch by batch."""
    gen_s = ll_s = 0.0
    gen, ll = [], []
    for i in range(0, len(questions), batch_size):
        batch = questions[i : i + batch_size]
        by_generation(model, batch, max_new_tokens), by_likelihood(model, batch)  # warm-up
        times = {"gen": [], "ll": []}
        for _ in range(repeats):
            start = time.perf_counter()
            letters_gen = by_generation(model, batch, max_new_tokens)
            times["gen"].append(time.perf_counter() - start)
            start = time.perf_counter()
            letters_ll = by_likelihood(model, batch)
            times["ll"].append(time.perf_counter() - start)
        gen_s, ll_s = gen_s + min(times["gen"]), ll_s + min(times["ll"])
        gen, ll = gen + letters_gen, ll + letters_ll
    n = len(questions)
    print(f"[{name}] batch {batch_size:>2}, {n} questions: generation {n / gen_s:6.1f} q/s, likelihood "
          f"{n / ll_s:6.1f} q/s -> likelihood is {gen_s / ll_s:.2f}x as fast")  # fmt: skip
    return gen, ll


def agreement_report(name: str, questions, gen: list[str], ll: list[str]) -> None:
    from merv.prompting import option_letters

    n = len(questions)
    answers = [q["answer"] for q in questions]
    valid = [i for i, (q, letter) in enumerate(zip(questions, gen, strict=True))
             if letter in option_letters(len(q["continuations"]))]  # fmt: skip
    agree = sum(g == x for g, x in zip(gen, ll, strict=True))
    gen_acc = sum(g == a for g, a in zip(gen, answers, strict=True)) / n
    ll_acc = sum(x == a for x, a in zip(ll, answers, strict=True)) / n
    print(f"[{name}] accuracy: generation (first character, MERV) {gen_acc:.3f}, likelihood {ll_acc:.3f}; "
          f"generation gave no option letter {n - len(valid)}/{n}; agreement {agree}/{n} = {agree / n:.3f} "
          f"({sum(gen[i] == ll[i] for i in valid)}/{len(valid)} where generation gave a letter)")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        nargs="+",
        help="checkpoint folders; speed is timed on the last (default: train "
        "merv_tiny first, then its align checkpoint, whose LLM is untrained, and its finetune one)",
    )
    p.add_argument("--data", help="shard folder of synth_mcq (with --model)")
    p.add_argument("--work", help="work folder for the training run (default: a temporary one)")
    p.add_argument("--train-videos", type=int, default=800)
    p.add_argument("--eval-videos", type=int, default=200)
    p.add_argument("--finetune-epochs", type=int, default=4, help="(merv-tiny's preset: 14)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=32, help="the pipeline's eval batch size")
    p.add_argument("--max-new-tokens", type=int, default=8, help="synth_mcq's generation limit")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--single-questions", type=int, default=50, help="questions timed one at a time (batch 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()  # fmt: skip

    from merv.eval.benchmark import CheckpointHandle

    if args.model:
        models, data = [Path(m) for m in args.model], Path(args.data or REPO / "data" / "shards" / "eval" / "synth_mcq")
    else:
        work = Path(args.work or tempfile.mkdtemp(prefix="merv-evalmcq-")).resolve()
        finetuned, data = train_tiny(work, args.train_videos, args.eval_videos, args.finetune_epochs)
        models = [finetuned.with_name("align"), finetuned]
        os.chdir(work)  # the checkpoint names its frozen weights relative to the pipeline's folder
    torch.manual_seed(0)
    print(f"synth_mcq shards {data}; per batch the best of {args.repeats} back-to-back rounds; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for model_dir in models:
        handle = CheckpointHandle(model_dir, device=args.device, dtype=args.dtype)
        questions = load_questions(handle, data, args.limit)
        print(f"[{model_dir.name}] {model_dir} on {handle.device} ({handle.dtype_name})")
        with torch.no_grad():
            for bs, subset in ((1, questions[: args.single_questions]), (args.batch_size, questions)):
                gen, ll = speed_report(model_dir.name, handle.model, subset, bs, args.max_new_tokens, args.repeats)
        agreement_report(model_dir.name, questions, gen, ll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
