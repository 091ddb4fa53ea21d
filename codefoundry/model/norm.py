"""RMSNorm with learned, frozen, or no gains."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """``x / rms(x) * gain``.

    ``learnable=False`` drops the gain entirely (modded-nanogpt style). ``frozen=True`` keeps
    the gain as a parameter fixed at 1 with ``requires_grad=False``: the FP8-stable QK-norm
    recipe, where trainable QK gains can grow and overflow low-precision attention logits.
    The optimizer's ``param_groups`` skips parameters that do not require gradients.
    """

    def __init__(self, dim: int, eps: float, learnable: bool = True, frozen: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=not frozen) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
