"""The code scorer a training run is given (``train.humaneval_every`` / ``train.mbpp_every``).

The training engine may not import the eval layer, so the command level builds this scorer and
hands it to ``pretrain`` / ``sft`` / ``dpo``; it satisfies
:class:`codefoundry.train.code_eval.CodeScorer`. Generated programs run only in the sandbox
(:func:`codefoundry.eval.codegen.quick_humaneval`), so a program that loops, exhausts memory or
writes files cannot harm the run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from codefoundry.config import TrainConfig
from codefoundry.eval.codegen import quick_humaneval
from codefoundry.tokenizer import CodeTokenizer


def code_scorer(tc: TrainConfig) -> Callable[[nn.Module, Path, list[str]], dict[str, float]]:
    """Greedy pass@1 on the first ``train.eval_limit`` tasks of each benchmark (``train.eval_data``)."""

    def score(model: nn.Module, tokenizer_json: Path, benchmarks: list[str]) -> dict[str, float]:
        tokenizer = CodeTokenizer.from_file(tokenizer_json)
        return {f"{bench}_pass@1": quick_humaneval(model, tokenizer, tc.eval_limit, tc.eval_max_new_tokens,
                                                   tc.eval_data or None, benchmark=bench)[f"{bench}/pass@1"]
                for bench in benchmarks}

    return score
