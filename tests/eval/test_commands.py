"""The evaluation commands end to end: merv eval (chunks, judge from flags or the pipeline config), merge,
collect, table; errors name what is wrong."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from merv.cli import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One answer cache for the module: later commands reuse earlier answers (and load no model)."""
    return tmp_path_factory.mktemp("answers")


def _eval(checkpoint, shards, bench, out, cache, *extra) -> int:
    args = ["eval", "--model", str(checkpoint), "--data", str(shards[bench]), "--name", bench, "--out", str(out)]
    return main([*args, "--cache", str(cache), "--batch-size", "2", *map(str, extra)])


def test_eval_merge_collect_table(checkpoint, shards, start_judge, cache, tmp_path, capsys):
    server = start_judge("--model", "judge-13b")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"eval": {"judge": {"url": server.url, "preset": "merv-original"}}}))
    assert _eval(checkpoint, shards, "synth_open", tmp_path / "open.json", cache, "--pipeline-config", config) == 0
    opened = json.loads((tmp_path / "open.json").read_text())
    assert opened["summary"]["metric"] == "judge_accuracy" and opened["manifest"]["judge"]["model"] == "judge-13b"
    assert opened["manifest"]["judge"]["preset"] == "merv-original" and server.requests()[0]["max_tokens"] == 500

    chunks = [tmp_path / f"mcq-{k}.json" for k in range(2)]
    for k, path in enumerate(chunks):
        assert _eval(checkpoint, shards, "synth_mcq", path, cache, "--num-chunks", 2, "--chunk-index", k) == 0
    assert main(["merge", *map(str, chunks), "--out", str(tmp_path / "mcq.json")]) == 0
    assert _eval(checkpoint, shards, "synth_mcq", tmp_path / "whole.json", cache) == 0
    merged, whole = (json.loads((tmp_path / f).read_text()) for f in ("mcq.json", "whole.json"))
    assert whole["run"]["model_loads"] == 0, "every answer came from the chunks' cache"
    assert (merged["rows"], merged["summary"]) == (whole["rows"], whole["summary"])

    results = [str(tmp_path / f) for f in ("mcq.json", "open.json")]
    assert main(["collect", *results, "--model", "tiny", "--out", str(tmp_path / "eval.json")]) == 0
    collected = json.loads((tmp_path / "eval.json").read_text())
    assert set(collected["benchmarks"]) == {"synth_mcq", "synth_open"}
    assert collected["benchmarks"]["synth_mcq"]["manifest"]["checkpoint"]["weights_sha256"]
    assert "rows" not in collected["benchmarks"]["synth_mcq"]

    capsys.readouterr()
    assert main(["table", str(tmp_path / "eval.json"), "--out", str(tmp_path / "table")]) == 0
    md = (tmp_path / "table" / "table.md").read_text()
    assert md == capsys.readouterr().out and "| tiny |" in md and "synth_open<br>judge_accuracy" in md
    assert "synth_open: judge judge-13b" in md
    assert Image.open(tmp_path / "table" / "table.png").size[0] > 100


def test_merge_and_judge_errors_are_named(checkpoint, shards, start_judge, cache, tmp_path, capsys):
    chunks = [tmp_path / f"c{k}.json" for k in range(3)]
    for k, path in enumerate(chunks):
        assert _eval(checkpoint, shards, "synth_mcq", path, cache, "--num-chunks", 3, "--chunk-index", k) == 0
    assert main(["merge", str(chunks[0]), str(chunks[2]), "--out", str(tmp_path / "m.json")]) == 1
    assert "missing chunk indexes [1]" in capsys.readouterr().err
    data = json.loads(chunks[1].read_text())
    lost = data["rows"].pop(0)["question_id"]
    chunks[1].write_text(json.dumps(data))
    assert main(["merge", *map(str, chunks), "--out", str(tmp_path / "m.json")]) == 1
    assert f"missing question ids '{lost}'" in capsys.readouterr().err and not (tmp_path / "m.json").exists()

    server = start_judge("--error-first", "100")
    code = _eval(checkpoint, shards, "synth_open", tmp_path / "o.json", cache, "--judge-url", server.url,
                 "--judge-model", "x", "--judge-max-attempts", 2)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "merv eval: error: judge at" in err and "failed 2 times in a row (http_500)" in err
    assert not (tmp_path / "o.json").exists()
