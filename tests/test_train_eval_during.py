"""Code benchmarks during training: pass@1 logged next to the loss (pretrain and SFT), best-by-pass@1,
sandboxed programs, and a clear error when a run asks for scores but was given no scorer."""

from __future__ import annotations

import json

import pytest
from helpers_post import make_checkpoint

from codefoundry.cli import main
from codefoundry.config import ConfigError
from codefoundry.errors import UserError
from codefoundry.eval import codegen
from codefoundry.eval.benchmarks import load_problems
from codefoundry.eval.during_training import code_scorer
from codefoundry.recipes import build_run_config
from codefoundry.train.metrics import read_metrics
from codefoundry.train.trainer import pretrain

SCORING = ["train.humaneval_every=2", "train.eval_limit=3", "train.eval_max_new_tokens=8"]


def _run(data, out, eval_data, steps=4, **over):
    overrides = [f"train.data={data}", f"train.out={out}", f"train.max_steps={steps}", "train.seq_len=64",
                 "train.batch_size=4", "train.log_every=1", "train.warmup_steps=1", *SCORING,
                 f"train.eval_data={eval_data}"]
    return build_run_config("tiny", None, overrides + [f"{k}={v}" for k, v in over.items()])


def test_pass_at_1_is_logged_next_to_the_loss(tiny_data, shared_data, tmp_path):
    run = _run(tiny_data, tmp_path, shared_data, **{"train.eval_limit": 2})
    summary = pretrain(run, show_progress=False, scorer=code_scorer(run.train))
    scored = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "humaneval_pass@1" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert all(r["humaneval_pass@1"] == 0.0 for r in scored)  # a 4-step model solves nothing
    assert summary["humaneval_pass@1"] == 0.0 and summary["finished"]


def test_generated_programs_cannot_harm_the_run(tiny_data, shared_data, tmp_path, monkeypatch):
    """One task solved, one program that never ends, one that kills its parent and fills memory."""
    problems = load_problems("humaneval", shared_data, limit=3)
    bodies = [problems[0].canonical, "    while True:\n        pass\n",
              "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    x = 'x' * (1 << 34)\n"]
    by_prompt = dict(zip((p.prompt for p in problems), bodies))
    monkeypatch.setattr(codegen, "model_generate",
                        lambda model, tok, sampling: lambda prompts, stop, seed: [by_prompt[p] for p in prompts])
    run = _run(tiny_data, tmp_path, shared_data, **{"train.keep_best_metric": "humaneval_pass@1"})
    summary = pretrain(run, show_progress=False, scorer=code_scorer(run.train))
    assert summary["finished"] and summary["steps"] == 4
    scored = [r["humaneval_pass@1"] for r in read_metrics(tmp_path / "metrics.jsonl") if "humaneval_pass@1" in r]
    assert scored == [pytest.approx(1 / 3)] * 2
    best = json.loads((tmp_path / "checkpoint-best" / "meta.json").read_text())
    assert best["step"] == 2 and best["humaneval_pass@1"] == pytest.approx(1 / 3)  # first of the equal scores


def test_best_by_pass_at_1_needs_the_benchmark_on():
    with pytest.raises(ConfigError, match="humaneval_every"):
        build_run_config("tiny", None, ["train.keep_best_metric=humaneval_pass@1"])


def test_sft_scores_through_the_command(shared_data, tmp_path, monkeypatch):
    """`codefoundry sft` builds the scorer: pass@1 logged at steps 2 and 4, and in the summary."""
    ckpt = make_checkpoint(tmp_path / "base")
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "add two numbers"},
                                             {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]}))
    problems = load_problems("humaneval", shared_data, limit=3)
    solved = {problems[1].prompt: problems[1].canonical}  # one of three solved, so a score is really computed
    monkeypatch.setattr(codegen, "model_generate",
                        lambda model, tok, sampling: lambda prompts, stop, seed: [solved.get(p, "") for p in prompts])
    out = tmp_path / "sft"
    assert main(["sft", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "train.max_steps=4",
                 "train.batch_size=2", "train.seq_len=64", "train.device=cpu", *SCORING,
                 f"train.eval_data={shared_data}"]) == 0
    scored = [(r["step"], r["humaneval_pass@1"]) for r in read_metrics(out / "metrics.jsonl")
              if "humaneval_pass@1" in r]
    assert scored == [(2, pytest.approx(1 / 3)), (4, pytest.approx(1 / 3))]
    assert json.loads((out / "summary.json").read_text())["humaneval_pass@1"] == pytest.approx(1 / 3)


def test_scores_asked_for_without_a_scorer_fail_before_training(tiny_data, shared_data, tmp_path):
    with pytest.raises(UserError, match="code scorer"):
        pretrain(_run(tiny_data, tmp_path, shared_data), show_progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
