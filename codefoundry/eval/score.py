"""Score completions against a benchmark in the sandbox.

Input is the official harnesses' samples format, one ``{"task_id", "completion"}`` per line,
so any model's outputs can be checked. Each program is split (:func:`checked_program`) so
that its test runs in a checker process the completion cannot reach; the summary lists
which guarantees of that hold on this host. Output is a per-sample JSONL (sample index,
task_id, completion, passed, error kind, detail, duration), a summary JSON and a short
markdown table. Each result is appended and flushed as soon as its program finishes, and
a rerun with the same output skips samples already scored, so an interrupted run loses
nothing.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from codefoundry.errors import UserError
from codefoundry.eval.benchmarks import (
    Problem,
    get_benchmark,
    load_problems,
    read_records,
)
from codefoundry.eval.passk import mean_pass_at_k
from codefoundry.progress import Progress
from codefoundry.sandbox.runner import CheckedProgram, Sandbox, SandboxLimits

DEFAULT_KS = (1, 10, 100)


def read_samples(path: str | Path) -> list[dict]:
    """Samples as ``{"task_id": str, "completion": str}``; extra keys are ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"samples file {path} not found; pass a JSONL of {{task_id, completion}} lines")
    samples = []
    for line_no, row in enumerate(read_records(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str) or "task_id" not in row:
            raise UserError(f"{path}: record {line_no} needs a task_id and a string completion")
        samples.append({"task_id": str(row["task_id"]), "completion": row["completion"]})
    return samples


@functools.cache
def split_reference(problem: Problem) -> tuple[str, tuple[str, ...]]:
    """(prelude, names) from the reference program (head + canonical + suffix).

    The prelude is its top-level statements that lie wholly outside the part a completion
    writes: the prompt's imports and helper functions, which the test may use. The names
    are those bound by the other statements, which the completion writes or finishes (the
    entry point, all of an MBPP answer): the only names the test takes from the program.
    """
    reference = problem.head + problem.canonical + (problem.suffix or "")
    lines = reference.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    answer_start, answer_end = len(problem.head), len(problem.head) + len(problem.canonical)
    kept, names = [], set()
    for node in ast.parse(reference).body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        start, end = offsets[first - 1], offsets[node.end_lineno]
        if end < answer_start or start > answer_end:
            kept.append(reference[start:end].rstrip("\n") + "\n")
        else:
            names |= bound_names(node)
    return "".join(kept), tuple(sorted(names))


def bound_names(statement: ast.stmt) -> set[str]:
    """The global names a top-level statement binds (definitions, imports, assignments)."""
    names, todo = set(), [statement]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue  # what is bound inside is local to it
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias.asname or alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        todo += ast.iter_child_nodes(node)
    return names


def checked_program(problem: Problem, completion: str) -> CheckedProgram:
    """The reference harness's program for ``completion`` (``problem.program``), split into the
    completion's module, the trusted prelude and the test."""
    suffix = problem.suffix or ""
    assert problem.tail.startswith(suffix)
    prelude, names = split_reference(problem)
    return CheckedProgram(code=problem.head + completion + suffix, prelude=prelude, test=problem.tail[len(suffix):],
                          names=names)


def check_samples(problems: dict[str, Problem], indexed: Iterable[tuple[int, dict]],
                  sandbox: Sandbox) -> Iterator[dict]:
    """Run each (index, sample)'s program; yield result records as programs finish."""
    indexed = list(indexed)
    programs = (checked_program(problems[s["task_id"]], s["completion"]) for _, s in indexed)
    for j, result in sandbox.run_many(programs):
        index, sample = indexed[j]
        yield {"sample": index, "task_id": sample["task_id"], "completion": sample["completion"],
               "passed": result.passed, "error": result.error, "detail": result.detail,
               "duration": result.duration}


def summarize(benchmark: str, records: list[dict], n_problems: int, ks: Iterable[int]) -> dict:
    """pass@k over the tasks that have samples, plus pass and failure counts."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        per_task[r["task_id"]].append(r["passed"])
    return {
        "benchmark": benchmark,
        "tasks": len(per_task),
        "tasks_without_samples": n_problems - len(per_task),
        "samples": len(records),
        "passed": sum(r["passed"] for r in records),
        "pass_at_k": mean_pass_at_k(((len(v), sum(v)) for v in per_task.values()), ks),
        "errors": dict(Counter(r["error"] for r in records if not r["passed"]).most_common()),
    }


def markdown(summary: dict) -> str:
    """A short table for READMEs and reports."""
    ks = list(summary["pass_at_k"])
    head = ["benchmark", "tasks", "samples", "passed", *ks]
    row = [summary["benchmark"], summary["tasks"], summary["samples"], summary["passed"],
           *(f"{100 * v:.2f}%" for v in summary["pass_at_k"].values())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(map(str, row)) + " |"]
    if summary["errors"]:
        lines += ["", "Failures: " + ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) + "."]
    if summary["tasks_without_samples"]:
        lines += ["", f"{summary['tasks_without_samples']} tasks had no samples and are not counted."]
    if "sandbox" in summary:
        lines += ["", "Sandbox: " + "; ".join(summary["sandbox"]["isolation"]) + "."]
        integrity = summary["sandbox"].get("verdict_integrity", {})
        lines += ["", "Verdict integrity against programs built to cheat:"]
        lines += [f"- {'holds' if held else 'does NOT hold'}: {what}" for what, held in integrity.items()]
    return "\n".join(lines) + "\n"


def default_output(samples_path: str | Path) -> Path:
    path = Path(samples_path)
    name = path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return path.with_name(name + "_results.jsonl")


def report_paths(output: Path) -> tuple[Path, Path]:
    """Where the summary JSON and markdown of a results file go."""
    return output.with_suffix(".summary.json"), output.with_suffix(".md")


def load_done(output: Path, samples: list[dict]) -> dict[int, dict]:
    """Records already in ``output``, checked against ``samples`` (a torn last line is dropped)."""
    done: dict[int, dict] = {}
    if not output.is_file():
        return done
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            index = rec["sample"]
            same = 0 <= index < len(samples) and {k: rec[k] for k in ("task_id", "completion")} == samples[index]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by an interrupted run
        if not same:
            raise UserError(f"{output} holds results for other samples (sample {index} differs); "
                            "pass another --output or delete it")
        done[index] = rec
    return done


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_records(output: Path, done: dict[int, dict]) -> None:
    write_atomic(output, "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))


def score_samples(benchmark: str, samples_path: str | Path, output: str | Path | None = None, *,
                  data: str | Path | None = None, limit: int | None = None, ks: Iterable[int] = DEFAULT_KS,
                  workers: int | None = None, timeout: float | None = None,
                  show_progress: bool = True, extra: dict | None = None) -> dict:
    """Score a samples file; write results, summary JSON and markdown; return the summary.

    ``limit`` keeps the first N tasks of the benchmark (samples of other tasks are skipped);
    ``extra`` is merged into the summary (e.g. the sampling settings that made the samples).
    """
    bench = get_benchmark(benchmark)
    all_problems = load_problems(benchmark, data)
    problems = {p.task_id: p for p in all_problems[:limit]}
    samples = read_samples(samples_path)
    known = {p.task_id for p in all_problems}
    unknown = sorted({s["task_id"] for s in samples} - known)
    if unknown:
        raise UserError(f"{samples_path}: task ids {unknown[:3]} are not in {benchmark}; "
                        "score with the benchmark the samples were made for")
    output = Path(output) if output else default_output(samples_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(output, samples)
    write_records(output, done)  # drop a torn last line before appending
    wanted = [i for i, s in enumerate(samples) if s["task_id"] in problems]
    pending = [(i, samples[i]) for i in wanted if i not in done]
    start = time.perf_counter()
    with Sandbox(SandboxLimits(timeout=timeout or bench.timeout), workers) as sandbox:
        progress = Progress(f"score {benchmark}", total=len(pending), unit="prog", enabled=show_progress)
        with output.open("a", encoding="utf-8") as out:
            for rec in check_samples(problems, pending, sandbox):
                out.write(json.dumps(rec) + "\n")
                out.flush()
                done[rec["sample"]] = rec
                progress.update()
        progress.close()
        summary = summarize(benchmark, [done[i] for i in wanted], len(problems), ks)
        summary.update(samples_file=str(samples_path), scored_now=len(pending), resumed=len(wanted) - len(pending),
                       seconds=round(time.perf_counter() - start, 2), sandbox=sandbox.describe(), **(extra or {}))
    write_records(output, done)
    summary_path, md_path = report_paths(output)
    write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    write_atomic(md_path, markdown(summary))
    return summary
