"""Scoring samples files: reference solutions pass, wrong ones fail; outputs, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codefoundry.cli import main
from codefoundry.errors import UserError
from codefoundry.eval.benchmarks import load_problems
from codefoundry.eval.score import default_output, report_paths, score_samples


def write_samples(path: Path, samples: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_humaneval_canonical_164_of_164_and_wrong_solutions_fail(shared_data, tmp_path):
    problems = load_problems("humaneval", shared_data)
    samples = write_samples(tmp_path / "samples.jsonl",
                            [(p.task_id, c) for p in problems for c in (p.canonical, "    return None\n")])
    summary = score_samples("humaneval", samples, tmp_path / "out.jsonl", data=shared_data, ks=(1, 2),
                            show_progress=False)
    results = read_results(tmp_path / "out.jsonl")
    assert [r["sample"] for r in results] == list(range(328))
    canonical, wrong = results[0::2], results[1::2]
    assert [r["task_id"] for r in canonical if not r["passed"]] == []
    assert [r["task_id"] for r in wrong if r["passed"]] == []
    assert all(r["error"] is None and r["duration"] > 0 for r in canonical)
    assert all(r["error"] in ("assertion", "exception") for r in wrong)
    assert summary["tasks"] == 164 and summary["passed"] == 164
    assert summary["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}
    summary_path, md_path = report_paths(tmp_path / "out.jsonl")
    assert json.loads(summary_path.read_text())["pass_at_k"] == summary["pass_at_k"]
    assert "| humaneval | 164 | 328 | 164 | 50.00% | 100.00% |" in md_path.read_text()


def test_mbpp_reference_code_passes_every_test_task(shared_data, tmp_path):
    problems = load_problems("mbpp", shared_data)
    # Wrong: each tenth task answered with the next task's code.
    wrong = [(p.task_id, q.canonical) for p, q in zip(problems[::10], problems[1::10])]
    samples = write_samples(tmp_path / "mbpp.jsonl", [(p.task_id, p.canonical) for p in problems] + wrong)
    # A generous timeout: task 123's reference needs ~5 s of CPU, more on a loaded machine.
    summary = score_samples("mbpp", samples, data=shared_data, timeout=60, show_progress=False)
    results = read_results(default_output(samples))
    failed = [(r["task_id"], r["error"], r["detail"]) for r in results[:500] if not r["passed"]]
    assert failed == []
    assert not any(r["passed"] for r in results[500:])
    assert summary["tasks"] == 500 and summary["passed"] == 500


@pytest.mark.parametrize("name", ["infill-random-span-light", "infill-single-line", "infill-multi-line"])
def test_infilling_canonical_passes(shared_data, tmp_path, name):
    problems = load_problems(name, shared_data, limit=30)
    samples = write_samples(tmp_path / "s.jsonl", [(p.task_id, c) for p in problems for c in (p.canonical, "(((\n")])
    summary = score_samples(name, samples, tmp_path / "r.jsonl", data=shared_data, limit=len(problems),
                            show_progress=False)
    results = read_results(tmp_path / "r.jsonl")
    assert all(r["passed"] for r in results[0::2]) and not any(r["passed"] for r in results[1::2])
    assert summary["errors"] == {"syntax": len(problems)}


def test_resume_skips_scored_samples_and_survives_a_torn_line(shared_data, tmp_path):
    problems = load_problems("humaneval", shared_data, limit=6)
    samples = write_samples(tmp_path / "s.jsonl", [(p.task_id, p.canonical) for p in problems])
    out = tmp_path / "r.jsonl"
    first = score_samples("humaneval", samples, out, data=shared_data, limit=4, show_progress=False)
    assert (first["scored_now"], first["resumed"]) == (4, 0)
    with out.open("a") as f:
        f.write('{"sample": 4, "task_id": "Huma')  # an interrupted write
    second = score_samples("humaneval", samples, out, data=shared_data, show_progress=False)
    assert (second["scored_now"], second["resumed"], second["passed"]) == (2, 4, 6)
    assert [r["sample"] for r in read_results(out)] == list(range(6))
    third = score_samples("humaneval", samples, out, data=shared_data, limit=2, show_progress=False)
    assert (third["scored_now"], third["tasks"]) == (0, 2)
    assert len(read_results(out)) == 6  # a smaller --limit keeps earlier work


def test_results_of_other_samples_are_not_mixed_in(shared_data, tmp_path):
    problems = load_problems("humaneval", shared_data, limit=2)
    out = tmp_path / "r.jsonl"
    score_samples("humaneval", write_samples(tmp_path / "a.jsonl", [(p.task_id, p.canonical) for p in problems]), out,
                  data=shared_data, show_progress=False)
    other = write_samples(tmp_path / "b.jsonl", [(p.task_id, "    return 1\n") for p in problems])
    with pytest.raises(UserError, match="other samples"):
        score_samples("humaneval", other, out, data=shared_data, show_progress=False)


def test_bad_samples_are_one_clear_error(shared_data, tmp_path):
    with pytest.raises(UserError, match="not in humaneval"):
        score_samples("humaneval", write_samples(tmp_path / "x.jsonl", [("MBPP/1", "")]), data=shared_data)
    (tmp_path / "y.jsonl").write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(UserError, match="record 1"):
        score_samples("humaneval", tmp_path / "y.jsonl", data=shared_data)


def test_cli_score(shared_data, tmp_path, capsys):
    problems = load_problems("humaneval", shared_data, limit=3)
    samples = write_samples(tmp_path / "s.jsonl", [(p.task_id, p.canonical) for p in problems])
    out = tmp_path / "res.jsonl"
    args = ["eval", "score", "--benchmark", "humaneval", "--samples", str(samples), "--data", str(shared_data),
            "--limit", "2", "--workers", "1", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert '{"pass@1": 1.0}' in printed and "| humaneval | 2 | 2 | 2 | 100.00% |" in printed
    assert len(read_results(out)) == 2
    assert main(["eval", "score", "--benchmark", "mbpp", "--samples", str(samples), "--data", str(shared_data)]) == 2
    assert "not in mbpp" in capsys.readouterr().err
