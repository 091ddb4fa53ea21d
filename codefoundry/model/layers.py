"""The transformer block: attention and feed-forward (dense or MoE) with pre- or post-norm placement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from codefoundry.config import ModelConfig
from codefoundry.model.attention import Attention, DiffAttention
from codefoundry.model.kv_cache import KVCache
from codefoundry.model.mlp import MLP
from codefoundry.model.moe import MoE
from codefoundry.model.norm import RMSNorm

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


class Block(nn.Module):
    """Attention + feed-forward, each as a residual branch.

    Pre-norm: ``x + f(norm(x))``. Post-norm (OLMo-2 / Swin-v2 "res-post-norm"): ``x + norm(f(x))``;
    normalising the branch output bounds what each layer adds to the residual stream, which
    keeps activations in FP8 range. Norm names stay ``attn_norm``/``mlp_norm`` in both cases.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_learnable)
        self.attn = (DiffAttention if cfg.diff_attn else Attention)(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_learnable)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | BlockMask | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if self.post_norm:
            x = x + self.drop(self.attn_norm(self.attn(x, cos, sin, mask, cache)))
            return x + self.drop(self.mlp_norm(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))
