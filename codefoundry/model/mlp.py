"""Dense feed-forward layers: SwiGLU, Smooth-SwiGLU, ReLU² and GELU."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from codefoundry.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU (gate * up, SiLU), Smooth-SwiGLU, ReLU² or GELU feed-forward.

    Smooth-SwiGLU (Fishman et al. 2024, "Scaling FP8 training to trillion-token LLMs") divides
    each channel of the SwiGLU product by its absolute maximum over the current batch before the down
    projection and folds that scale back into the down-projection weight. The result equals
    SwiGLU up to rounding, but the tensor the down projection reads stays within [-1, 1]
    per channel, so the SwiGLU outlier channels that overflow FP8 late in training cannot.
    """

    def __init__(self, cfg: ModelConfig, width: int | None = None) -> None:
        super().__init__()
        self.kind = cfg.mlp
        width = width or cfg.ffn_dim
        gated = self.kind in ("swiglu", "smooth_swiglu")
        self.gate_proj = nn.Linear(cfg.dim, width, bias=cfg.bias) if gated else None
        self.up_proj = nn.Linear(cfg.dim, width, bias=cfg.bias)
        self.down_proj = nn.Linear(width, cfg.dim, bias=cfg.bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activation the down projection reads (before any Smooth-SwiGLU scaling)."""
        if self.gate_proj is not None:
            return F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.kind == "relu2":
            return F.relu(self.up_proj(x)).square()
        return F.gelu(self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if self.kind != "smooth_swiglu":
            return self.down_proj(h)
        scale = h.detach().flatten(0, -2).abs().amax(dim=0).clamp(min=1e-6)  # per channel
        return functional_call(self.down_proj, {"weight": self.down_proj.weight * scale}, (h / scale,))
