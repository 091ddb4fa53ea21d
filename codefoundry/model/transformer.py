"""The decoder-only transformer: embeddings -> blocks -> norm -> (tied) LM head."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from codefoundry.config import ModelConfig
from codefoundry.model.kv_cache import KVCache
from codefoundry.model.layers import Block, RMSNorm
from codefoundry.model.rope import rope_tables

IGNORE_INDEX = -100


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual-output projections scaled down with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            s = std
            if self.cfg.depth_scaled_init and name.endswith(("o_proj.weight", "down_proj.weight")):
                s = std / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(p, mean=0.0, std=s)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for token ids (B, T)."""
        start = cache.pos if cache is not None else 0
        t = idx.shape[1]
        if start + t > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, V) without targets; with targets the cross-entropy (ignoring -100)."""
        h = self.hidden_states(idx, cache)
        if targets is None:
            return self.logits(h)
        return self.loss(h, targets, reduction)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the LM head on hidden states, ignoring targets equal to -100.

        With ``loss_chunk > 0`` the head runs over that many rows at a time under activation
        checkpointing, so full-vocabulary logits never exist for the whole batch at once.
        """
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        chunk = self.cfg.loss_chunk
        if chunk <= 0 or h.shape[0] <= chunk:
            total = self._ce_sum(h, targets)
        else:
            total = sum(checkpoint(self._ce_sum, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                        for i in range(0, h.shape[0], chunk))
        if reduction == "sum":
            return total
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def _ce_sum(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(h).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")

    def post_step(self) -> None:
        """Called by the trainer after each optimizer step (e.g. MoE load-balancing bias updates)."""

    def extra_metrics(self) -> dict[str, float]:
        """Model-specific training metrics (e.g. router load) merged into each log record."""
        return {}

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len or self.cfg.max_seq_len,
                       self.cfg.head_dim, p.device, p.dtype)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N for weights + attention scores."""
        c = self.cfg
        n = self.num_params(exclude_embedding=True)
        if c.tie_embeddings:
            n += self.embed.weight.numel()  # the tied head still does its matmul
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
