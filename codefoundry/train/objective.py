"""What a stage plugs into the training engine: an objective and a batch source.

An objective turns one micro-batch into the *sum* of its units' losses (target tokens for
language modelling, pairs for DPO) and says how many units the micro-batch holds. The
engine divides by the units of the whole global batch (every micro-batch, every rank), so
each unit weighs the same however units fall into micro-batches and ranks.

A batch source yields this rank's micro-batches and can save and restore its position, so
a resumed run reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from codefoundry.model.transformer import IGNORE_INDEX

Forward = Callable[..., torch.Tensor]  # the model as the engine runs it (wrapped, maybe compiled)


class Objective(Protocol):
    def units(self, batch: Any) -> torch.Tensor | int:
        """Number of loss units in ``batch``: a 0-d device tensor (counted without a host sync), or an
        int when the batch's shape fixes it, the same on every rank (no counting, no collective)."""

    def tokens(self, batch: Any) -> int:
        """Tokens the model reads for ``batch`` (from shapes only; for throughput figures)."""

    def loss(self, model: Forward, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the units' losses, metrics as sums over the units); the engine averages both."""


class BatchSource(Protocol):
    def next_batch(self, step: int) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NextTokenLoss:
    """Cross-entropy of next-token prediction, summed over target tokens (IGNORE_INDEX excluded).

    Batches are (inputs, targets) pairs of (rows, seq_len) tensors. ``masked=False`` declares
    that no target is ever IGNORE_INDEX (packed pretraining rows), so every token counts.
    """

    def __init__(self, masked: bool = True) -> None:
        self.masked = masked

    def units(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | int:
        return (batch[1] != IGNORE_INDEX).sum() if self.masked else batch[1].numel()

    def tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()

    def loss(self, model: Forward, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return model(x, y, reduction="sum"), {}
