"""The evaluation stage on the tiny model: both MCQ protocols, the cache (rerun, resume), chunks, the judge."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from merv.eval.benchmark import CheckpointHandle, EvalSettings, chunk_bounds, evaluate, question_prompt
from merv.eval.cache import ResultCache
from merv.eval.judge import Judge, JudgeConfig, JudgeUnavailable
from merv.eval.merge import MergeError, merge_results
from merv.eval.metrics import first_char_letter
from merv.eval.registry import lookup

IDENTITY = {"config_fingerprint": "tiny-random", "weights_sha256": "none"}


def handle(model) -> CheckpointHandle:
    return CheckpointHandle.of_model(model, IDENTITY)


def comparable(result: dict) -> dict:
    """What must not depend on how a result was produced (chunks, cache, timing)."""
    return {k: result[k] for k in ("benchmark", "questions", "config_fingerprint", "summary", "rows")}


def test_mcq_prompt_lists_options(tiny_model):
    prompt = question_prompt(handle(tiny_model), lookup("synth_mcq"), {"question": "Q?", "options": ["x", "y"]})
    assert prompt.startswith("In: Q? Select the correct answer") and prompt.endswith("\n\n    A. x\nB. y\nOut:")


def test_mcq_by_generation_and_by_likelihood(tiny_model, shards):
    result = evaluate(handle(tiny_model), shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=4))
    rows, summary = result["rows"], result["summary"]
    assert summary["n"] == 6 == len(rows) and result["questions"]["total"] == 6
    for row in rows:
        # the original's rule: pred.lower()[:1] == letter.lower()
        assert row["letter"] == first_char_letter(row["prediction"]) == row["prediction"].strip()[:1].upper()
        assert row["correct_generate"] == (row["prediction"].strip().lower()[:1] == row["answer"].lower())
        assert row["correct_generate"] == (row["letter"] == row["answer"])
        ll = row["likelihood"]
        assert len(ll["logprobs"]) == row["num_options"] == (3 if row["question_type"] == "shape" else 4)
        assert ll["choice"] == "ABCD"[ll["logprobs"].index(max(ll["logprobs"]))]
        assert ll["correct"] == (ll["choice"] == row["answer"])
    m = summary["metrics"]
    assert m["accuracy_generate_firstchar"] == sum(r["correct_generate"] for r in rows) / 6
    assert m["accuracy_likelihood"] == sum(r["likelihood"]["correct"] for r in rows) / 6
    assert m["agreement_generate_likelihood"] == sum(r["letter"] == r["likelihood"]["choice"] for r in rows) / 6
    assert summary["chance"] == pytest.approx(sum(1 / r["num_options"] for r in rows) / 6)
    assert (summary["metric"], summary["value"]) == ("accuracy_generate_firstchar", m["accuracy_generate_firstchar"])
    assert summary["degenerate"]["no_option_letter"] == sum("no_option_letter" in r["degenerate"] for r in rows)
    types = Counter(r["question_type"] for r in rows)
    assert {t: s["n"] for t, s in summary["by_type"].items()} == dict(types)
    manifest = result["manifest"]
    assert manifest["decoding"]["mcq_letter_rule"].startswith("first character")
    assert manifest["frames"]["encoders"]["vivit"]["num_frames"] == 8 and manifest["prompt"]["format"] == "base"
    assert manifest["packages"]["torch"] and manifest["judge"] is None

    settings = EvalSettings(mcq="likelihood", batch_size=4)
    only_ll = evaluate(handle(tiny_model), shards["synth_mcq"], "synth_mcq", settings)
    assert only_ll["summary"]["metric"] == "accuracy_likelihood" and "degenerate" not in only_ll["summary"]
    assert [r["likelihood"] for r in only_ll["rows"]] == [r["likelihood"] for r in rows]


def test_a_rerun_loads_no_model_and_answers_from_the_cache(checkpoint, shards, tmp_path):
    first = CheckpointHandle(checkpoint)
    before = evaluate(first, shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=4), ResultCache(tmp_path))
    assert first.loads == 1 and before["run"]["answered_by_model"] == 6
    again = CheckpointHandle(checkpoint)
    after = evaluate(again, shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=4), ResultCache(tmp_path))
    assert again.loads == 0 and again.calls == {"generate": 0, "likelihood": 0}
    assert comparable(after) == comparable(before)
    # a decoding change misses the generation cache only: likelihood scores do not depend on it
    changed = CheckpointHandle(checkpoint)
    evaluate(
        changed, shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=4, max_new_tokens=3), ResultCache(tmp_path)
    )
    assert changed.calls == {"generate": 2, "likelihood": 0}


def test_an_interrupted_run_resumes_where_it_stopped(tiny_model, shards, tmp_path, monkeypatch):
    clean = evaluate(handle(tiny_model), shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=2))
    real = tiny_model.generate_batch
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "generate_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(
            handle(tiny_model), shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=2), ResultCache(tmp_path)
        )
    monkeypatch.setattr(tiny_model, "generate_batch", real)
    (cache_file,) = tmp_path.glob("*.jsonl")
    stored = cache_file.read_text().splitlines()
    assert len(stored) == 4, "the first batch (2 questions: answers and option scores) was stored before the crash"
    with open(cache_file, "a") as f:
        f.write('{"k": "abc", "v": {"predic')  # a write torn by the crash
    resumed = handle(tiny_model)
    result = evaluate(resumed, shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=2), ResultCache(tmp_path))
    assert result["run"]["answered_by_model"] == 4 and resumed.calls == {"generate": 2, "likelihood": 2}
    assert comparable(result) == comparable(clean)


def test_chunks_merge_to_the_unchunked_result(tiny_model, shards):
    settings = {"batch_size": 2, "mcq": "both"}
    whole = evaluate(handle(tiny_model), shards["synth_mcq"], "synth_mcq", EvalSettings(**settings))
    chunks = [
        (f"chunk{k}", evaluate(handle(tiny_model), shards["synth_mcq"], "synth_mcq",
                               EvalSettings(**settings, num_chunks=3, chunk_index=k)))
        for k in (2, 0, 1)
    ]  # fmt: skip
    assert [len(c["rows"]) for _, c in chunks] == [2, 2, 2]
    assert comparable(merge_results(chunks)) == comparable(whole)

    broken = copy.deepcopy(chunks)
    lost = broken[1][1]["rows"].pop(1)["question_id"]
    with pytest.raises(MergeError, match=f"chunk0 \\(chunk 0\\): missing question ids '{lost}'"):
        merge_results(broken)
    twice = copy.deepcopy(chunks)
    twice[0][1]["rows"].append(twice[0][1]["rows"][0])
    with pytest.raises(MergeError, match=f"duplicate question ids '{twice[0][1]['rows'][0]['question_id']}'"):
        merge_results(twice)
    with pytest.raises(MergeError, match=r"missing chunk indexes \[1\]"):
        merge_results(chunks[:2])
    with pytest.raises(MergeError, match=r"repeated chunk indexes \[0\]"):
        merge_results([*chunks, chunks[1]])
    tampered = copy.deepcopy(chunks)  # a chunk that drops a question from its own assignment too
    gone = tampered[2][1]["assigned"].pop()
    tampered[2][1]["rows"].pop()
    with pytest.raises(MergeError, match=f"missing question ids '{gone}'"):
        merge_results(tampered)
    other = evaluate(handle(tiny_model), shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=2, max_new_tokens=2))
    with pytest.raises(MergeError, match="differ in config_fingerprint"):
        merge_results([chunks[0], ("other", other)])


@pytest.mark.parametrize(("n", "chunks"), [(6, 3), (7, 3), (2, 4), (200, 8)])
def test_chunk_bounds_cover_every_question_once(n, chunks):
    covered = [i for k in range(chunks) for i in range(*chunk_bounds(n, chunks, k))]
    assert covered == list(range(n))


def test_limit_takes_the_first_questions(tiny_model, shards):
    result = evaluate(handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(limit=4, num_chunks=2,
                                                                                          chunk_index=1))  # fmt: skip
    assert result["questions"]["total"] == 4 and result["questions"]["limit"] == 4
    assert result["assigned"] == result["benchmark_ids"][2:4] and len(result["benchmark_ids"]) == 4


def test_open_ended_is_exact_match_without_a_judge_and_judged_with_one(tiny_model, shards, start_judge, tmp_path):
    plain = evaluate(handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(), ResultCache(tmp_path))
    assert plain["summary"]["metric"] == "exact_match" and "judged" not in plain["summary"]
    server = start_judge("--model", "judge-x")
    judge = Judge(JudgeConfig(url=server.url, backoff_s=0.01))
    judged = evaluate(
        handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(), ResultCache(tmp_path), judge
    )
    summary = judged["summary"]
    assert summary["metric"] == "judge_accuracy" and summary["judged"] == 6 and summary["unjudged"] == 0
    verdicts = [r["verdict"] for r in judged["rows"]]
    assert summary["metrics"]["judge_accuracy"] == sum(v["pred"] == "yes" for v in verdicts) / 6
    assert summary["metrics"]["judge_score"] == pytest.approx(sum(v["score"] for v in verdicts) / 6)
    assert summary["metrics"]["exact_match"] == plain["summary"]["metrics"]["exact_match"]
    assert (
        judged["manifest"]["judge"]["model"] == "judge-x"
        and judged["config_fingerprint"] != plain["config_fingerprint"]
    )
    assert len(server.requests()) == len({json.dumps([r["answer"], r["prediction"]]) for r in judged["rows"]})


def test_judge_killed_mid_run_then_resumed_judges_each_answer_once(tiny_model, shards, start_judge, tmp_path):
    cache_dir = tmp_path / "cache"
    evaluate(handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(), ResultCache(cache_dir))
    dying = start_judge("--die-after", "4")
    judge = Judge(JudgeConfig(url=dying.url, model="stand-in-judge", backoff_s=0.01, max_attempts=3, concurrency=1))
    with pytest.raises(JudgeUnavailable, match="connection"):
        evaluate(handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(), ResultCache(cache_dir), judge)
    assert [r["outcome"] for r in dying.requests()] == ["ok", "ok", "ok", "killed"]

    server = start_judge()
    judge = Judge(JudgeConfig(url=server.url, model="stand-in-judge", backoff_s=0.01))
    resumed = handle(tiny_model)
    result = evaluate(resumed, shards["synth_open"], "synth_open", EvalSettings(), ResultCache(cache_dir), judge)
    assert resumed.calls == {"generate": 0, "likelihood": 0}
    assert result["summary"]["judged"] == 6 and result["summary"]["unjudged"] == 0
    ok = Counter(r["key"] for r in dying.requests() + server.requests() if r["outcome"] == "ok")
    triples = {json.dumps([r["answer"], r["prediction"]]) for r in result["rows"]}
    assert len(ok) == len(triples) and set(ok.values()) == {1}, "every answer judged exactly once over both runs"
    assert len(server.requests()) == len(triples) - 3

    before = len(server.requests())
    judge = Judge(JudgeConfig(url=server.url, model="stand-in-judge"))
    again = evaluate(
        handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(), ResultCache(cache_dir), judge
    )
    assert len(server.requests()) == before and again["run"]["judge_requests"] == 0, "a rerun asks the judge nothing"
    assert comparable(again) == comparable(result)


def test_unparseable_verdicts_are_reported_unjudged_and_asked_again(tiny_model, shards, start_judge, tmp_path):
    server = start_judge("--malformed-first", "100")
    judge = Judge(JudgeConfig(url=server.url, backoff_s=0.01, parse_attempts=2))
    result = evaluate(
        handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(), ResultCache(tmp_path), judge
    )
    summary = result["summary"]
    assert summary["unjudged"] == 6 and summary["judged"] == 0 and summary["metrics"]["judge_accuracy"] is None
    assert all(r["unjudged"].startswith("unparseable after 2 attempts") for r in result["rows"])
    first = len(server.requests())
    judge = Judge(JudgeConfig(url=server.url, backoff_s=0.01, parse_attempts=2))
    evaluate(handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(), ResultCache(tmp_path), judge)
    assert len(server.requests()) == 2 * first, "nothing unjudged was cached as a verdict"


def test_the_judge_protocol_as_data_reaches_the_result(tiny_model, shards, start_judge, tmp_path):
    """A prompt file and the original's rule for unparseable replies: both in the manifest, the result's fingerprint
    and the verdicts' cache keys (the file's place is not, its wording is)."""
    from tests.eval.test_judge import ORIGINAL_STYLE

    server = start_judge("--malformed-first", "100")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prompt.yaml").write_text(ORIGINAL_STYLE)

    def run(prompt: str, **kw) -> dict:
        judge = Judge(
            JudgeConfig(url=server.url, model="m", backoff_s=0.01, parse_attempts=1, prompt_file=prompt, **kw)
        )
        return evaluate(
            handle(tiny_model), shards["synth_open"], "synth_open", EvalSettings(), ResultCache(tmp_path), judge
        )

    original = run(str(tmp_path / "a" / "prompt.yaml"), unparseable="no")
    assert original["summary"]["counted_as_no"] == 6 and original["summary"]["metrics"]["judge_accuracy"] == 0.0
    judge_info = original["manifest"]["judge"]
    assert judge_info["unparseable"] == "no" and judge_info["prompt_file"] == str(tmp_path / "a" / "prompt.yaml")
    assert (
        judge_info["prompt_sha256"]
        == Judge(JudgeConfig(url=server.url, model="m", prompt_file=str(tmp_path / "a" / "prompt.yaml"))).prompt.sha256
    )
    asked = len(server.requests())
    moved = run(str(tmp_path / "b" / "prompt.yaml"), unparseable="no")  # the same wording elsewhere: all cached
    assert len(server.requests()) == asked and moved["config_fingerprint"] == original["config_fingerprint"]
    ours = run(str(tmp_path / "b" / "prompt.yaml"))
    assert ours["summary"]["unjudged"] == 6 and ours["config_fingerprint"] != original["config_fingerprint"]
    (tmp_path / "b" / "prompt.yaml").write_text(ORIGINAL_STYLE.replace("Please evaluate", "Evaluate"))
    reworded = run(str(tmp_path / "b" / "prompt.yaml"), unparseable="no")
    assert len(server.requests()) == asked + 6 + 6, "another wording asks the judge again"
    assert reworded["config_fingerprint"] != original["config_fingerprint"]
