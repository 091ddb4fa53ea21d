"""Attention: GQA/MQA/MHA with RoPE, QK-norm, KV cache, learned sinks, and differential attention.

* :func:`attend` — SDPA over a shared mask from :mod:`codefoundry.model.masking`; with sinks,
  an explicit softmax whose denominator also holds one learned logit per head.
* :class:`Attention` — the projections (``q_proj``/``k_proj``/``v_proj``/``o_proj``), optional
  QK-RMSNorm (trainable or frozen gains) and optional sinks (``sinks``, one per query head).
* :class:`DiffAttention` — Differential Transformer attention (Ye et al. 2024): query/key heads
  come in pairs, each pair yields two softmax maps, and the output is
  ``(softmax(Q1 K1) - lambda * softmax(Q2 K2)) V`` with V twice as wide, then a per-head
  RMSNorm scaled by ``1 - lambda_init``. The projections and KV cache keep the standard
  layout, so it has the parameter count of standard attention plus 6 * head_dim per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from codefoundry.config import ModelConfig
from codefoundry.model.kv_cache import KVCache
from codefoundry.model.norm import RMSNorm
from codefoundry.model.rope import apply_rope


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, H, Tq, D) over k/v (B, Hkv, Tk, D*), GQA by head groups.

    ``mask`` (B, 1, Tq, Tk) bool, True = visible; ``None`` = causal with the queries being the
    last Tq keys. ``sinks`` (H,) adds ``exp(sink)`` to each softmax denominator (attention may
    "go nowhere"); that needs the probabilities, so it takes the explicit (unfused) path.
    """
    tq, tk = q.shape[2], k.shape[2]
    if sinks is None:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=mask is None and tq > 1, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    if mask is None:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(q.shape[0], -1, tq, 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    probs = F.dropout(probs, dropout) if dropout > 0 else probs
    return probs.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_learnable, frozen=cfg.qk_norm_frozen)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_learnable, frozen=cfg.qk_norm_frozen)
        # Sinks start at 0: exp(0) = 1 "virtual key" of weight comparable to one real key.
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sinks else None
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = self.mix(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            dropout: float) -> torch.Tensor:
        """Per-head outputs (B, heads, T, width) with heads * width == n_heads * head_dim."""
        return attend(q, k, v, mask, dropout, self.sinks)


def lambda_init_for(layer: int) -> float:
    """The Differential Transformer's depth schedule, layer counted from 0."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


class DiffAttention(Attention):
    """Differential attention; query/key heads 2i and 2i+1 form pair i, value heads are paired likewise."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.lambda_init = lambda_init_for(layer)
        d = cfg.head_dim
        self.lambda_q1 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(d) * 0.1)
        self.subln = RMSNorm(2 * d, cfg.norm_eps, cfg.norm_learnable)

    def lam(self) -> torch.Tensor:
        """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (a re-parameterised learned scalar)."""
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1).float())
                - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2).float()) + self.lambda_init)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            dropout: float) -> torch.Tensor:
        b, hkv, t, d = v.shape
        # Pair value heads into half as many heads of twice the width.
        v2 = v.view(b, hkv // 2, 2, t, d).permute(0, 1, 3, 2, 4).reshape(b, hkv // 2, t, 2 * d)
        a1 = attend(q[:, 0::2], k[:, 0::2], v2, mask, dropout)
        a2 = attend(q[:, 1::2], k[:, 1::2], v2, mask, dropout)
        out = a1 - self.lam().to(a1.dtype) * a2
        return self.subln(out) * (1 - self.lambda_init)
