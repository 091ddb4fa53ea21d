"""Code benchmarks during training: greedy pass@1 on a few HumanEval / MBPP tasks, every N steps.

``train.humaneval_every`` / ``train.mbpp_every`` ask for it; the engine calls :func:`code_scores`
after a step and logs what it returns next to the loss. Generation uses the plain (unwrapped,
uncompiled) model; every rank runs it, because an FSDP-sharded model needs all ranks in each
forward, and the generated programs run only in the sandbox
(:func:`codefoundry.eval.codegen.quick_humaneval`), so a program that loops, exhausts memory or
writes files cannot harm the run. The eval layer is imported only when a score is due.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from codefoundry.config import TrainConfig
from codefoundry.runtime import autocast

BENCHMARKS = ("humaneval", "mbpp")


def due(tc: TrainConfig, step: int, total: int) -> list[str]:
    """The benchmarks to score after ``step``: every N steps and at the last one."""
    return [b for b in BENCHMARKS if (every := getattr(tc, f"{b}_every")) and (step % every == 0 or step == total)]


def code_scores(model: nn.Module, tokenizer_json: Path, tc: TrainConfig, benchmarks: list[str],
                device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """``{"<bench>_pass@1": score}`` for each of ``benchmarks`` on the first ``train.eval_limit`` tasks."""
    from codefoundry.eval.codegen import quick_humaneval
    from codefoundry.tokenizer import CodeTokenizer

    tokenizer = CodeTokenizer.from_file(tokenizer_json)
    scores: dict[str, Any] = {}
    for bench in benchmarks:
        with torch.no_grad(), autocast(device, dtype):
            result = quick_humaneval(model, tokenizer, tc.eval_limit, tc.eval_max_new_tokens, tc.eval_data or None,
                                     benchmark=bench)
        scores[f"{bench}_pass@1"] = result[f"{bench}/pass@1"]
    return scores
