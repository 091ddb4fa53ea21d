"""Learning-rate schedules as a multiplier of the base rate.

WSD (warmup-stable-decay) holds the peak rate until the last ``decay_fraction`` of
training and then decays linearly; it needs the total only for the decay, which is why a
time-budgeted run can size itself after a few steps. Cosine is the classic alternative.
"""

from __future__ import annotations

import math

from codefoundry.errors import UserError


def lr_factor(step: int, total: int, warmup: int, schedule: str, decay_fraction: float = 0.3,
              min_ratio: float = 0.0) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= 0:
        return 1.0
    if schedule == "wsd":
        decay_start = int(total * (1 - decay_fraction))
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(1, total - decay_start)
        return min_ratio + (1 - min_ratio) * max(0.0, 1 - frac)
    if schedule == "cosine":
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    raise UserError(f"train.schedule={schedule!r}: use wsd, cosine or constant")


def curriculum_seq_len(step: int, stages: list[tuple[int, int]], seq_len: int) -> int:
    """Row length for ``step``: the first stage not yet finished, else the full ``seq_len``."""
    return next((length for length, until in stages if step < until), seq_len)
