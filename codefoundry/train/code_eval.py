"""Code benchmarks during training: which are due at a step, and the scorer the engine is given.

``train.humaneval_every`` / ``train.mbpp_every`` ask for greedy pass@1 every N steps; the engine
logs what the scorer returns next to the loss. Scoring needs the eval layer (sandbox, benchmark
files), which ``train/`` must not import, so the engine only knows the :class:`CodeScorer`
interface and the command level (``codefoundry pretrain`` / ``sft`` / ``dpo``, which may import
every stage) builds one with :func:`codefoundry.eval.during_training.code_scorer` and passes it in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn

from codefoundry.config import TrainConfig
from codefoundry.errors import UserError

BENCHMARKS = ("humaneval", "mbpp")


class CodeScorer(Protocol):
    """Scores a model on code benchmarks: ``{"<bench>_pass@1": score}`` for each benchmark named.

    The engine calls it on the plain (unwrapped, uncompiled) model, on every rank (an FSDP-sharded
    model needs all ranks in each forward), under ``no_grad`` and the run's autocast.
    """

    def __call__(self, model: nn.Module, tokenizer_json: Path, benchmarks: list[str]) -> dict[str, float]: ...


def due(tc: TrainConfig, step: int, total: int) -> list[str]:
    """The benchmarks to score after ``step``: every N steps and at the last one."""
    return [b for b in BENCHMARKS if (every := getattr(tc, f"{b}_every")) and (step % every == 0 or step == total)]


def check_scorer(tc: TrainConfig, scorer: CodeScorer | None) -> None:
    """Fail before training, not at the first due step, when benchmarks are on but nothing can score them."""
    if scorer is None and any(getattr(tc, f"{b}_every") for b in BENCHMARKS):
        raise UserError("train.humaneval_every / train.mbpp_every need a code scorer: run `codefoundry pretrain` "
                        "(or sft/dpo), or pass scorer=codefoundry.eval.during_training.code_scorer(run.train)")
