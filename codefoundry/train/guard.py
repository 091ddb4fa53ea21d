"""NaN / loss-spike guard: skip an unhealthy optimizer step instead of corrupting the weights.

A step is unhealthy when its loss or gradient norm is not finite, or (after warm-up) its
loss exceeds ``spike_factor`` times the running mean of recent healthy losses. The verdict
is a device tensor that the optimizer applies on the device (see
:meth:`codefoundry.train.optim.Optimizers.step`), so the guard never makes the host wait for
the GPU; its counters are read only when the trainer logs. The loss and gradient norm it
judges are global (summed over ranks before it sees them), so every rank reaches the same
verdict without another collective. After ``max_skips`` consecutive skips training stops
with a clear message at the next log step: the skipped steps changed nothing, and the run
needs a lower learning rate, not patience.
"""

from __future__ import annotations

from typing import Any

import torch

from codefoundry.errors import UserError

EMA_WEIGHT = 0.05  # weight of the newest loss in the running mean (~20-step memory)


class StepGuard:
    def __init__(self, enabled: bool, spike_factor: float, max_skips: int, warmup_steps: int,
                 device: torch.device | str = "cpu") -> None:
        self.enabled, self.spike_factor, self.max_skips = enabled, spike_factor, max_skips
        self.warmup_steps = warmup_steps
        self.mean = torch.tensor(float("nan"), device=device)  # running mean of healthy losses (NaN: none yet)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.worst = torch.zeros((), dtype=torch.int64, device=device)  # longest skip run since the last check
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=device)

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor | None:
        """The step's verdict as a 0-d bool tensor (True: skip it), or None when the guard is off."""
        if not self.enabled:
            return None
        loss = loss.detach()
        bad = ~torch.isfinite(loss if grad_norm is None else loss + grad_norm)  # inf + -inf is NaN too
        if self.spike_factor > 0 and step >= self.warmup_steps:
            bad |= loss > self.spike_factor * self.mean  # False while the mean is NaN
        # The running mean starts at the first healthy loss (a lerp from NaN would stay NaN).
        start = torch.where(torch.isnan(self.mean), loss, self.mean)
        self.mean = torch.where(bad, self.mean, torch.lerp(start, loss, EMA_WEIGHT))
        self.consecutive = (self.consecutive + 1) * bad
        self.worst = torch.maximum(self.worst, self.consecutive)
        self.skipped_total += bad
        return bad

    @property
    def skipped(self) -> int:
        """Steps skipped so far (reads the device)."""
        return int(self.skipped_total)

    def raise_if_stuck(self, step: int) -> None:
        """Stop the run if ``max_skips`` steps in a row were skipped since the last call (reads the device)."""
        worst = int(self.worst)
        self.worst = self.consecutive.clone()
        if self.enabled and worst >= self.max_skips:
            raise UserError(f"{worst} consecutive steps had a non-finite or spiking loss (up to step {step}); "
                            "lower train.lr or raise train.warmup_steps and resume from the last checkpoint")

    def state_dict(self) -> dict[str, Any]:
        mean = None if torch.isnan(self.mean) else float(self.mean)
        return {"mean": mean, "consecutive": int(self.consecutive),
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.mean.device
        mean = state.get("mean")
        self.mean = torch.tensor(float("nan") if mean is None else mean, dtype=torch.float32, device=device)
        self.consecutive = torch.tensor(state.get("consecutive", 0), device=device)
        self.worst = self.consecutive.clone()
        self.skipped_total = torch.tensor(state.get("skipped", 0), device=device)
