"""Model-driven evaluation: prompts, stop sequences, sampling, scoring; a stand-in generator
for the logic and a tiny random checkpoint for the real path end to end."""

from __future__ import annotations

import json

import pytest
from helpers_post import tiny_checkpoint

from codefoundry.cli import main
from codefoundry.errors import UserError
from codefoundry.eval.benchmarks import BENCHMARKS, load_problems
from codefoundry.eval.codegen import (
    Sampling,
    evaluate,
    generate_samples,
    model_generate,
    postprocess,
    quick_humaneval,
)


def oracle(problems, junk: str):
    """A generator that answers every prompt with the reference solution followed by ``junk``."""
    by_prompt = {p.prompt: p.canonical for p in problems}
    calls = []

    def generate(prompts, stop, seed):
        calls.append((prompts, stop, seed))
        return [by_prompt[p[0] if isinstance(p, tuple) else p] + junk for p in prompts]

    return generate, calls


def test_postprocess_cuts_like_the_reference_harnesses():
    assert postprocess(BENCHMARKS["humaneval"], "    return 1\n\ndef g():\n    pass\n") == "    return 1\n"
    assert postprocess(BENCHMARKS["humaneval"], "    return 1\nprint(f(2))") == "    return 1"
    assert postprocess(BENCHMARKS["mbpp"], "def f():\n    return 1\n[DONE]\nYou are") == "def f():\n    return 1\n"
    assert postprocess(BENCHMARKS["infill-single-line"], "    x = 1\n    y = 2\n") == "    x = 1\n"
    assert postprocess(BENCHMARKS["infill-multi-line"], "    x = 1\n    y = 2\n") == "    x = 1\n    y = 2\n"


def test_sampling_settings_are_checked():
    with pytest.raises(UserError, match="temperature"):
        Sampling(n=5, temperature=0.0)
    with pytest.raises(UserError):
        Sampling(batch_size=0)


def test_samples_keep_problem_order_and_n_per_task(shared_data):
    problems = load_problems("humaneval", shared_data, limit=5)
    generate, calls = oracle(problems, "")
    samples = generate_samples(BENCHMARKS["humaneval"], problems, generate,
                               Sampling(n=3, temperature=0.8, batch_size=4, seed=7), show_progress=False)
    assert [s["task_id"] for s in samples] == [p.task_id for p in problems for _ in range(3)]
    assert all(s["completion"] == p.canonical for s, p in zip(samples, (p for p in problems for _ in range(3))))
    assert [len(c[0]) for c in calls] == [4, 4, 4, 3]
    assert {c[2] for c in calls} == {7, 11, 15, 19}  # a different seed per batch
    assert all(c[1] == list(BENCHMARKS["humaneval"].stop) for c in calls)


@pytest.mark.parametrize(("name", "junk"), [
    ("humaneval", "\ndef helper():\n    return 0\n"),
    ("mbpp", "\n[DONE]\n\nYou are an expert"),
    ("infill-single-line", "garbage that is cut"),
])
def test_evaluate_scores_generated_samples(shared_data, tmp_path, name, junk):
    problems = load_problems(name, shared_data, limit=4)
    generate, calls = oracle(problems, junk)
    out = tmp_path / f"{name}.jsonl"
    summary = evaluate(name, generate, Sampling(batch_size=2), out, data=shared_data, limit=4, workers=2,
                       timeout=10, show_progress=False)
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    assert summary["sampling"]["batch_size"] == 2
    assert isinstance(calls[0][0][0], tuple) == name.startswith("infill")
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == [p.task_id for p in problems]
    assert all(len(json.loads(line)) == 7 for line in out.read_text().splitlines())


def test_quick_humaneval_with_a_stand_in(shared_data):
    problems = load_problems("humaneval", shared_data, limit=3)
    generate, _ = oracle(problems, "")

    class Model:
        training = True

        def eval(self):
            self.training = False

        def train(self, mode=True):
            self.training = mode

    model = Model()
    result = quick_humaneval(model, None, limit=3, data=shared_data, generate=generate)
    assert result == {"humaneval/pass@1": 1.0, "humaneval/tasks": 3.0}
    assert model.training  # put back in training mode


def test_tiny_checkpoint_end_to_end(shared_data, tmp_path):
    from codefoundry.checkpoint import load_model

    model, tokenizer = load_model(tiny_checkpoint())
    result = quick_humaneval(model, tokenizer, limit=2, max_new_tokens=8, data=shared_data)
    assert result == {"humaneval/pass@1": 0.0, "humaneval/tasks": 2.0}  # random weights solve nothing
    summary = evaluate("infill-single-line", model_generate(model, tokenizer, Sampling(max_new_tokens=6)),
                       Sampling(max_new_tokens=6), tmp_path / "fim.jsonl", data=shared_data, limit=2,
                       show_progress=False)
    assert summary["samples"] == 2 and summary["tasks"] == 2


def test_cli_model_eval(shared_data, tmp_path, capsys):
    out = tmp_path / "he.jsonl"
    args = ["eval", "humaneval", "--checkpoint", str(tiny_checkpoint()), "--data", str(shared_data), "--limit", "2",
            "--n", "2", "--temperature", "0.8", "--max-new-tokens", "4", "--output", str(out), "--k", "1,2"]
    assert main(args) == 0
    assert "| humaneval | 2 | 4 | 0 | 0.00% | 0.00% |" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 4
    assert main(["eval", "mbpp", "--checkpoint", str(tmp_path / "missing"), "--data", str(shared_data)]) == 2
