"""NaN / loss-spike guard: skip an unhealthy optimizer step instead of corrupting the weights.

A step is unhealthy when its loss or gradient norm is not finite, or (after warm-up) its
loss exceeds ``spike_factor`` times the running mean of recent healthy losses. The verdict
is computed on the device and read as one scalar per step, the guard's only host sync
(``train.nan_guard=false`` removes it). Every rank reaches the same verdict, so DDP/FSDP
ranks never disagree about stepping. After ``max_skips`` consecutive skips training stops
with a clear message: at that point the run needs a lower learning rate, not patience.
"""

from __future__ import annotations

from typing import Any

import torch

from codefoundry.errors import UserError
from codefoundry.train.distributed import DistInfo, any_across_ranks

EMA_WEIGHT = 0.05  # weight of the newest loss in the running mean (~20-step memory)


class StepGuard:
    def __init__(self, enabled: bool, spike_factor: float, max_skips: int, warmup_steps: int,
                 info: DistInfo | None = None) -> None:
        self.enabled, self.spike_factor, self.max_skips = enabled, spike_factor, max_skips
        self.warmup_steps = warmup_steps
        self.info = info or DistInfo()
        self.mean: torch.Tensor | None = None  # running mean of healthy losses (on the device)
        self.consecutive = 0
        self.skipped = 0

    def healthy(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Whether to apply this step's update; raises UserError after too many skips in a row."""
        if not self.enabled:
            return True
        bad = ~torch.isfinite(loss)
        if grad_norm is not None:
            bad |= ~torch.isfinite(grad_norm)
        if self.spike_factor > 0 and self.mean is not None and step >= self.warmup_steps:
            bad |= loss > self.spike_factor * self.mean
        if bool(any_across_ranks(bad, self.info).item()):
            self.consecutive += 1
            self.skipped += 1
            if self.consecutive >= self.max_skips:
                raise UserError(f"{self.consecutive} consecutive steps had a non-finite or spiking loss "
                                f"(last at step {step + 1}); lower train.lr or raise train.warmup_steps and "
                                "resume from the last checkpoint")
            return False
        self.consecutive = 0
        loss = loss.detach().float()
        self.mean = loss.clone() if self.mean is None else torch.lerp(self.mean, loss, EMA_WEIGHT)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"mean": None if self.mean is None else self.mean.item(),
                "consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        mean = state.get("mean")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=device)
        self.consecutive, self.skipped = state.get("consecutive", 0), state.get("skipped", 0)
