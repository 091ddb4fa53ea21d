"""Code benchmarks during training: pass@1 logged next to the loss, best-by-pass@1, sandboxed programs."""

from __future__ import annotations

import json

import pytest

from codefoundry.config import ConfigError
from codefoundry.eval import codegen
from codefoundry.eval.benchmarks import load_problems
from codefoundry.recipes import build_run_config
from codefoundry.train.metrics import read_metrics
from codefoundry.train.trainer import pretrain


def _run(data, out, eval_data, steps=4, **over):
    overrides = [f"train.data={data}", f"train.out={out}", f"train.max_steps={steps}", "train.seq_len=64",
                 "train.batch_size=4", "train.log_every=1", "train.warmup_steps=1", "train.humaneval_every=2",
                 "train.eval_limit=3", "train.eval_max_new_tokens=8", f"train.eval_data={eval_data}"]
    return build_run_config("tiny", None, overrides + [f"{k}={v}" for k, v in over.items()])


def test_pass_at_1_is_logged_next_to_the_loss(tiny_data, shared_data, tmp_path):
    summary = pretrain(_run(tiny_data, tmp_path, shared_data, **{"train.eval_limit": 2}), show_progress=False)
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
    summary = pretrain(run, show_progress=False)
    assert summary["finished"] and summary["steps"] == 4
    scored = [r["humaneval_pass@1"] for r in read_metrics(tmp_path / "metrics.jsonl") if "humaneval_pass@1" in r]
    assert scored == [pytest.approx(1 / 3)] * 2
    best = json.loads((tmp_path / "checkpoint-best" / "meta.json").read_text())
    assert best["step"] == 2 and best["humaneval_pass@1"] == pytest.approx(1 / 3)  # first of the equal scores


def test_best_by_pass_at_1_needs_the_benchmark_on():
    with pytest.raises(ConfigError, match="humaneval_every"):
        build_run_config("tiny", None, ["train.keep_best_metric=humaneval_pass@1"])
