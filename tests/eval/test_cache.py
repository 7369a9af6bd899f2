"""The answer/verdict cache: content keys, durable appends, torn lines, several writers."""

from __future__ import annotations

import subprocess
import sys

from merv.eval.cache import ResultCache, content_key


def test_keys_depend_on_every_field_and_not_on_order():
    a = content_key("verdict", {"judge_model": "m", "prompt_version": "v1", "prediction": "red"})
    assert a == content_key("verdict", {"prediction": "red", "prompt_version": "v1", "judge_model": "m"})
    assert a != content_key("verdict", {"judge_model": "m", "prompt_version": "v2", "prediction": "red"})
    assert a != content_key("generate", {"judge_model": "m", "prompt_version": "v1", "prediction": "red"})


def test_records_survive_a_reopen_and_a_torn_line(tmp_path, caplog):
    cache = ResultCache(tmp_path)
    cache.put("k1", {"prediction": "A"})
    cache.put_many({"k2": {"prediction": "B"}, "k3": {"prediction": "ü"}})
    (path,) = tmp_path.glob("*.jsonl")
    with open(path, "a") as f:
        f.write('{"k": "k4", "v": {"pre')  # the process died mid-write
    reopened = ResultCache(tmp_path)
    assert [reopened.get(k) for k in ("k1", "k2", "k3", "k4")] == [{"prediction": "A"}, {"prediction": "B"},
                                                                  {"prediction": "ü"}, None]  # fmt: skip
    assert "incomplete (interrupted write)" in caplog.text
    reopened.put("k4", {"prediction": "D"})  # a new process writes its own file: the torn line stays harmless
    assert len(list(tmp_path.glob("*.jsonl"))) == 2 and ResultCache(tmp_path).get("k4") == {"prediction": "D"}


def test_parallel_writer_processes_keep_every_record(tmp_path):
    code = (
        "import sys; from merv.eval.cache import ResultCache; c = ResultCache(sys.argv[1]); "
        "[c.put(f'{sys.argv[2]}-{i}', {'i': i}) for i in range(200)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"w{w}"]) for w in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    cache = ResultCache(tmp_path)
    assert len(cache) == 600 and cache.get("w2-199") == {"i": 199}


def test_no_directory_keeps_records_in_memory_only(tmp_path):
    cache = ResultCache(None)
    cache.put("k", {"v": 1})
    assert cache.get("k") == {"v": 1} and not list(tmp_path.iterdir())
