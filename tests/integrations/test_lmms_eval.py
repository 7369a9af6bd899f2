"""merv's lmms-eval model: the same answers and log-likelihoods as merv's own code on the same inputs, and lmms-eval
(its released CLI, the entry point, the repository's local task) scoring the synthetic benchmark exactly as
``merv eval`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

try:
    from lmms_eval.api.instance import Instance
except ImportError as e:  # not in `dev`: lmms-eval pins PyAV < 16, which merv's test helpers cannot use
    raise ImportError("lmms-eval is not installed: python -m merv.integrations.install_lmms_eval") from e

from tests.integrations.conftest import EVAL_VIDEOS, REPO, TAUGHT, pyproject

BATCH = 4  # lmms-eval and merv eval batch the questions alike (same order, same size): identical numerics


@pytest.fixture(scope="module")
def lm(untrained_checkpoint):
    from merv.integrations.lmms_eval import MervLmms

    return MervLmms(pretrained=str(untrained_checkpoint), device="cpu", batch_size=2, max_new_tokens=12)


@pytest.fixture(scope="module")
def questions(bench) -> list[dict]:
    """The benchmark's first questions as lmms-eval documents (question, options, answer_id, video path)."""
    from merv.data.shards import benchmark_items

    return [{**it.record, "video": str(it.media)} for it in benchmark_items(bench)[:5]]


def instance(kind: str, args: tuple, doc_id: int, task: str = "t"):
    return Instance(kind, args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def video_of(doc: dict) -> list[str]:
    return [doc["video"]]


def reference_videos(model, paths: list[str]) -> dict[str, torch.Tensor]:
    """Frames as ``model.generate`` samples them: read_frames at the encoders' frame size, each encoder's transform."""
    from merv.data.transforms import frame_size
    from merv.data.video import read_frames

    counts = [e.num_frames for e in model.encoders.values()]
    rows = []
    for path in paths:
        frames, pos = read_frames(path, counts, frame_size(model.cfg.encoders))
        rows.append(model.transform({n: frames[pos[e.num_frames]] for n, e in model.encoders.items()}))
    return {n: torch.stack([r[n] for r in rows]) for n in model.encoders}


def stop_string(answers: list[str]) -> str:
    """Two ASCII letters from the second half of an answer: a stop string that cuts it."""
    for answer in answers:
        for k in range(len(answer) // 2, len(answer) - 1):
            if answer[k : k + 2].isascii() and answer[k : k + 2].isalpha():
                return answer[k : k + 2]
    raise AssertionError(f"no answer to cut: {answers}")


def prompt_of(model, message: str) -> str:
    builder = model.get_prompt_builder()
    return builder.add_turn("human", message)


# ------------------------------------------------------------------------------------------------------------------


def test_generate_until_equals_generate_batch(lm, questions):
    from merv.decoding import StopStrings
    from merv.prompting import mcq_prompt

    model = lm.model
    lm.task_dict = {"t": {"test": questions}}
    messages = [mcq_prompt(q["question"], q["options"]) for q in questions]
    prompts = [prompt_of(model, m) for m in messages]
    videos = reference_videos(model, [q["video"] for q in questions])
    # the reference: generate_batch in the plugin's batches (2, 2, 1), greedy
    greedy = []
    for lo in range(0, len(questions), 2):
        greedy += model.generate_batch({n: v[lo : lo + 2] for n, v in videos.items()}, prompts[lo : lo + 2], 12)
    assert len({g for g in greedy}) > 1 and all(len(g) >= 4 for g in greedy), greedy
    stop = stop_string(greedy)

    plain = {"until": ["\n\n"], "max_new_tokens": 12, "temperature": 0, "do_sample": True}  # temperature 0: greedy
    stopped = {"until": stop, "max_new_tokens": 12}
    # two settings interleaved: answered per setting in batches, returned in request order
    reqs = [instance("generate_until", (m, dict(kw), video_of, i, "t", "test"), i)
            for i, m in enumerate(messages) for kw in (plain, stopped)]  # fmt: skip
    out = lm.generate_until(reqs)
    assert out[0::2] == [g.split("\n\n")[0].strip() for g in greedy]
    assert out[1::2] == [g.split(stop)[0].strip() for g in greedy]
    assert any(o != g for o, g in zip(out[1::2], greedy, strict=True))
    # the stopping criterion ends a row as soon as its text holds the stop string (not only cut afterwards)
    ends = StopStrings(model.tokenizer, [stop])
    for answer in greedy:
        ids = torch.tensor([model.tokenizer.encode(answer, add_special_tokens=False)])
        assert ends(ids, None).tolist() == [stop in answer]

    # sampling: the same draw as generate_batch's under the same seed
    sample = {"temperature": 0.9, "max_new_tokens": 12, "until": []}
    torch.manual_seed(3)
    got = lm.generate_until([instance("generate_until", (m, sample, video_of, i, "t", "test"), i)
                             for i, m in enumerate(messages[:2])])  # fmt: skip
    torch.manual_seed(3)
    two = {n: v[:2] for n, v in videos.items()}
    assert got == model.generate_batch(two, prompts[:2], 12, do_sample=True, temperature=0.9)

    # text only (doc_to_visual gives nothing): generate_batch without videos
    text = lm.generate_until(
        [instance("generate_until", ("Describe the video.", plain, lambda d: [], 0, "t", "test"), 0)]
    )
    assert text == [
        model.generate_batch(None, [prompt_of(model, "Describe the video.")], 12)[0].split("\n\n")[0].strip()
    ]


def test_loglikelihood_equals_continuation_logprobs(lm, questions):
    from merv.decoding import letter_continuations
    from merv.eval.benchmark import CheckpointHandle
    from merv.eval.likelihood import continuation_logprobs
    from merv.prompting import mcq_prompt, option_letters

    model = lm.model
    lm.task_dict = {"t": {"test": questions}}
    docs = questions[:3]
    reqs, contexts, continuations, index = [], [], [], []
    handle = CheckpointHandle.of_model(model, {})
    for i, q in enumerate(docs):
        message = mcq_prompt(q["question"], q["options"])
        letters = option_letters(len(q["options"]))
        reqs += [instance("loglikelihood", (message, f" {x}", video_of, i, "t", "test"), i) for x in letters]
        contexts += [prompt_of(model, message)] * len(letters)
        continuations += letter_continuations(handle.prompt_builder, message, len(letters))  # what merv eval scores
        index += [i] * len(letters)
    got = lm.loglikelihood(reqs)

    videos = reference_videos(model, [q["video"] for q in docs])
    expected = []
    for lo in (0, 2):  # the plugin's batches: 2 documents, then 1
        rows = [k for k, v in enumerate(index) if lo <= v < lo + 2]
        batch = {n: v[lo : lo + 2] for n, v in videos.items()}
        expected += continuation_logprobs(model, batch, [contexts[k] for k in rows], [continuations[k] for k in rows],
                                          video_index=[index[k] - lo for k in rows])  # fmt: skip
    # lmms-eval's multiple_choice takes the smallest first element: its models return the loss
    assert got == [(-logprob, greedy) for logprob, greedy in expected]
    assert all(isinstance(s, float) and isinstance(g, bool) for s, g in got)

    # the task's delimiter does not matter: the continuation is written as the prompt format writes an answer
    first = mcq_prompt(docs[0]["question"], docs[0]["options"])
    same = lm.loglikelihood(
        [instance("loglikelihood", (first, x, video_of, 0, "t", "test"), 0) for x in ("A", " A", "\nA")]
    )
    assert same == [same[0]] * 3
    # the same number as in the two-document batch above, to float32 rounding (padding changes the kernels' sums)
    assert same[0][1] == got[0][1] and same[0][0] == pytest.approx(got[0][0], rel=1e-6)


def test_decoding_settings():
    from merv.integrations.lmms_eval import Decoding

    greedy = Decoding.of({"until": "\n", "max_new_tokens": 4, "temperature": 0, "do_sample": True, "top_p": 0.5}, 9)
    assert (greedy.max_new_tokens, greedy.stop, greedy.generate_kwargs) == (4, ("\n",), {"do_sample": False})
    assert Decoding.of(None, 9).generate_kwargs == {"do_sample": False} and Decoding.of(None, 9).max_new_tokens == 9
    sampled = Decoding.of({"temperature": 0.7, "top_p": 0.9, "num_beams": 1, "image_aspect_ratio": "pad"}, 9)
    assert sampled.generate_kwargs == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "num_beams": 1}
    assert sampled.ignored == ("image_aspect_ratio",)
    assert Decoding.of({"temperature": 0.7, "do_sample": False}, 9).generate_kwargs == {"do_sample": False}
    assert Decoding.of({"until": ["", "x"]}, 9).stop == ("x",)
    with pytest.raises(ValueError, match="'until' must be a string or a list of strings"):
        Decoding.of({"until": 3}, 9)
    with pytest.raises(ValueError, match="'max_new_tokens' must be a positive integer"):
        Decoding.of({"max_new_tokens": 0}, 9)


def test_visual_forms_and_errors(lm, questions, tmp_path):
    from PIL import Image

    from merv.data.video import read_frames
    from merv.integrations.lmms_eval import request_videos

    model, video = lm.model, questions[0]["video"]
    counts = {e.num_frames for e in model.encoders.values()}
    # a list of frames is one video; each encoder samples its own frames from it uniformly
    frames, _ = read_frames(video, [16], lm.frame_size)
    as_images = request_videos(model, [Image.fromarray(f) for f in frames], lm.frame_size)
    as_array = request_videos(model, [frames], lm.frame_size)
    for name, enc in model.encoders.items():
        assert as_images[name].shape == (enc.num_frames, 3, enc.image_size, enc.image_size)
        assert torch.equal(as_images[name], as_array[name])
    still = request_videos(model, Image.fromarray(frames[0]), lm.frame_size)
    assert all(torch.equal(v[0], v[-1]) for v in still.values()) and max(counts) > 1
    # a clip of a video: merv's {"path", "time", "end_frame"}
    clip = request_videos(model, [{"path": video, "end_frame": 4}], lm.frame_size)
    assert not all(torch.equal(clip[n], v) for n, v in request_videos(model, [video], lm.frame_size).items())

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 50)
    docs = [{"video": video}, {"video": str(tmp_path / "missing.mp4")}, {"video": str(broken)}]
    lm.task_dict = {"t": {"test": docs}}
    ask = lambda visual, i: instance("generate_until", ("Q?", {}, visual, i, "t", "test"), i)  # noqa: E731
    with pytest.raises(ValueError, match=r"task 't', split 'test', doc 1: cannot read video .*missing.mp4: file not"):
        lm.generate_until([ask(video_of, 0), ask(video_of, 1)])
    with pytest.raises(ValueError, match=r"doc 2: cannot read video .*broken.mp4: not a decodable video"):
        lm.generate_until([ask(video_of, 2)])
    with pytest.raises(ValueError, match=r"doc 0: 2 visuals \(str\): merv answers about one video"):
        lm.generate_until([ask(lambda d: [d["video"], d["video"]], 0)])
    with pytest.raises(NotImplementedError, match="multi-round tasks"):
        lm.generate_until_multi_round([])
    with pytest.raises(NotImplementedError, match="without a video"):
        lm.loglikelihood([instance("loglikelihood", ("", "A"), 0)])


def test_installer_keeps_pyav_and_the_pinned_release():
    from packaging.requirements import Requirement

    from merv.integrations import LMMS_EVAL_REQUIREMENT
    from merv.integrations.install_lmms_eval import requirements

    # the extra: the pinned release, and accelerate (which only the plugin imports)
    assert pyproject()["optional-dependencies"]["lmms-eval"][0] == LMMS_EVAL_REQUIREMENT
    needed = [Requirement(r) for r in requirements()]
    names = {r.name.lower() for r in needed}
    assert "av" not in names and {"datasets", "transformers", "loguru"} <= names
    assert all(r.marker is None or "extra" not in str(r.marker) for r in needed), "extras are not installed"


def test_entry_point_names_the_model():
    """pyproject.toml declares the entry point lmms-eval reads, and it resolves to the model class."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from merv.integrations.lmms_eval import MervLmms

    declared = pyproject()["entry-points"]["lmms_eval.models"]
    assert declared == {"merv": "merv.integrations:lmms_eval_manifest"}
    registry = ModelRegistryV2()
    module, _, attr = declared["merv"].partition(":")
    for manifest in registry._coerce_payload_to_manifests(getattr(__import__(module, fromlist=[attr]), attr)):
        registry.register_manifest(manifest)
    assert registry.get_model_class("merv") is MervLmms


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lmms_eval_scores_like_merv_eval(project, bench, mcq_checkpoint, entry_point_path, tmp_path):
    """The released lmms-eval CLI, with the plugin found through its entry point and the repository's local task,
    gives the accuracies of ``merv eval`` on the same questions (and the same answer to every question)."""
    from merv.cli import main
    from merv.config import load_run_config
    from merv.data.transforms import frame_size
    from merv.integrations import LMMS_TASKS_DIR

    # merv eval on lossless shards stored at the frame size the plugin decodes at (so both see the same pixels)
    cfg = load_run_config(mcq_checkpoint / "config.json").model
    shards, result = tmp_path / "shards", tmp_path / "merv-eval.json"
    counts = sorted({str(e.num_frames) for e in cfg.encoders})
    size = str(frame_size(cfg.encoders))
    assert main(["shard", str(bench), "--out", str(shards), "--frames", *counts, "--size", size,
                 "--frame-format", "npy", "--strict", "--no-progress"]) == 0  # fmt: skip
    assert main(["eval", "--model", str(mcq_checkpoint), "--data", str(shards), "--name", "synth_mcq",
                 "--out", str(result), "--mcq", "both", "--batch-size", str(BATCH), "--device", "cpu",
                 "--no-cache", "--no-judge"]) == 0  # fmt: skip
    merv = json.loads(result.read_text())

    out = tmp_path / "lmms"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(entry_point_path), str(REPO)]),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "merv", "--model_args", f"pretrained={mcq_checkpoint}",
           "--tasks", "merv_synth", "--include_path", str(LMMS_TASKS_DIR), "--batch_size", str(BATCH),
           "--device", "cpu", "--output_path", str(out), "--log_samples"]  # fmt: skip
    run = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    log = (run.stdout + run.stderr)[-4000:]
    found = sorted(out.rglob("*_results.json"))
    assert run.returncode == 0 and found, log
    lmms = json.loads(found[-1].read_text())
    assert lmms["config"]["model"] == "merv", lmms["config"]
    samples = {task: [json.loads(x) for x in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
               for task in ("merv_synth_mcq", "merv_synth_mcq_ppl")}  # fmt: skip

    ids = [q["question_id"] for q in json.loads((bench / "test_q.json").read_text())]
    rows = {r["question_id"]: r for r in merv["rows"]}
    assert len(ids) == len(rows) == EVAL_VIDEOS
    # generation: every answer the same, so the same accuracy by MERV's first-character rule
    generated = {ids[s["doc_id"]]: s["filtered_resps"][0] for s in samples["merv_synth_mcq"]}
    assert generated == {i: rows[i]["prediction"] for i in ids}
    accuracy = lmms["results"]["merv_synth_mcq"]["accuracy_generate_firstchar,none"]
    assert accuracy == merv["summary"]["metrics"]["accuracy_generate_firstchar"]
    # likelihood: the same log-probability of every option letter, the same choices and accuracy
    for s in samples["merv_synth_mcq_ppl"]:
        row = rows[ids[s["doc_id"]]]
        losses = [float(loss) for loss, _ in s["filtered_resps"]]
        np.testing.assert_allclose(losses, -np.array(row["likelihood"]["logprobs"]), rtol=0, atol=1e-5)
        assert int(np.argmin(losses)) == "ABCDE".index(row["likelihood"]["choice"])
    assert lmms["results"]["merv_synth_mcq_ppl"]["acc,none"] == merv["summary"]["metrics"]["accuracy_likelihood"]
    # a model that answers: nearly every answer an option letter (one never taught a question may answer otherwise;
    # both tools score it the same, as checked above), above chance (it was taught TAUGHT of the answers)
    assert merv["summary"]["degenerate"]["no_option_letter"] <= EVAL_VIDEOS // 8
    assert TAUGHT / 2 / EVAL_VIDEOS <= accuracy < 1, accuracy
    ours, ppl = merv["summary"]["metrics"], lmms["results"]["merv_synth_mcq_ppl"]["acc,none"]
    gen, ll = ours["accuracy_generate_firstchar"], ours["accuracy_likelihood"]
    print(f"\nlmms-eval / merv eval, {EVAL_VIDEOS} questions: generation {accuracy:.4f} / {gen:.4f}, "
          f"likelihood {ppl:.4f} / {ll:.4f}")  # fmt: skip
