"""Multi-token prediction heads (DeepSeek-V3 style, chained, sharing the LM head).

Head ``k`` (1-based) at position ``t`` combines the previous hidden state (the trunk's final
hidden state for ``k = 1``) with the embedding of token ``t + k``, which is known during
training (it is a target) and, when drafting, was just produced, and predicts token
``t + k + 1``. Unlike DeepSeek-V3's MTP module the head has no attention layer, only a
projection and a feed-forward residual: drafting then needs no KV cache of its own.
The extra loss trains the trunk to carry information about tokens further ahead, and the
heads draft tokens for self-speculative decoding (:mod:`codefoundry.infer.speculative`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from codefoundry.config import ModelConfig
from codefoundry.model.mlp import MLP
from codefoundry.model.norm import RMSNorm


class MTPHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_learnable)
        self.emb_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_learnable)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=cfg.bias)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_learnable)
        self.mlp = MLP(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_learnable)

    def forward(self, h: torch.Tensor, next_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(state for the next head, normalised hidden state for the shared LM head)."""
        x = self.proj(torch.cat([self.h_norm(h), self.emb_norm(next_emb)], dim=-1))
        x = x + self.mlp(self.mlp_norm(x))
        return x, self.norm(x)
