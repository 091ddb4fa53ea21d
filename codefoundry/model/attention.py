"""Attention: GQA/MQA/MHA with RoPE, QK-norm, KV cache, learned sinks, and differential attention.

* :func:`attend` — one entry point over the kernels of :mod:`codefoundry.model.masking`:
  SDPA (``is_causal`` or an explicit mask) or FlexAttention (a block mask). None of them
  repeats K/V heads for GQA in the fast paths, and none materialises fp32 B·H·T² scores.
  Sinks add ``exp(sink)`` to each softmax denominator: under FlexAttention by rescaling the
  output with ``sigmoid(lse - sink)`` (its log-sum-exp is returned alongside), under SDPA as
  one extra all-zero key/value whose logit is the sink, given as an additive mask column.
* :class:`Attention` — the projections (``q_proj``/``k_proj``/``v_proj``/``o_proj``, q/k/v with
  biases when ``qkv_bias``), optional QK-RMSNorm (trainable or frozen gains) and optional sinks
  (``sinks``, one per query head).
* :class:`DiffAttention` — Differential Transformer attention (Ye et al. 2024): query/key heads
  come in pairs, each pair yields two softmax maps, and the output is
  ``(softmax(Q1 K1) - lambda * softmax(Q2 K2)) V`` with V twice as wide, then a per-head
  RMSNorm scaled by ``1 - lambda_init``. The double-width V is split into its two halves and
  all four (map, half) products run as one attention call of ordinary head width, which is
  what the flash kernel needs. The projections and KV cache keep the standard layout, so it
  has the parameter count of standard attention plus 6 * head_dim per layer.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from codefoundry.config import ModelConfig
from codefoundry.model.kv_cache import KVCache
from codefoundry.model.norm import RMSNorm
from codefoundry.model.rope import apply_rope

if TYPE_CHECKING:  # FlexAttention imports torch._dynamo (seconds): only the training/GPU path loads it
    from torch.nn.attention.flex_attention import BlockMask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
           dropout: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, H, Tq, D) over k/v (B, Hkv, Tk, D), GQA by head groups.

    ``mask``: a :class:`BlockMask` (FlexAttention), a (B, 1, Tq, Tk) bool tensor (True =
    visible), or ``None`` = causal with the queries being the last Tq keys. ``sinks`` (H,)
    adds ``exp(sink)`` to each softmax denominator (attention may "go nowhere").
    """
    if mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask
        if dropout > 0:
            raise ValueError("FlexAttention has no attention dropout; masking.attention_kernel avoids it then")
        return _flex(q, k, v, mask, sinks)
    return _sdpa(q, k, v, mask, dropout, sinks)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float,
          sinks: torch.Tensor | None) -> torch.Tensor:
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=tq > 1, enable_gqa=gqa)
    if mask is None:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)[None, None]
    if sinks is not None:
        # One extra key with k = v = 0: its logit q.k is 0, plus the sink as an additive bias.
        b, hkv = k.shape[:2]
        zero = k.new_zeros(b, hkv, 1, k.shape[-1])
        k, v = torch.cat([k, zero], dim=2), torch.cat([v, zero.expand(-1, -1, -1, v.shape[-1])], dim=2)
        bias = torch.zeros(mask.shape[:2] + (tq, tk), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        sink = sinks.to(q.dtype).view(1, -1, 1, 1).expand(bias.shape[0], -1, tq, 1)
        mask = torch.cat([bias.expand(-1, sink.shape[1], -1, -1), sink], dim=-1)
    if gqa and q.is_cuda:
        # SDPA's memory-efficient kernel takes arbitrary masks but not enable_gqa (that would be math).
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


@functools.cache
def _compiled_flex():
    """FlexAttention is only fast compiled: an uncompiled model on CUDA calls this compiled copy
    (inside a compiled model the plain function is traced and compiled with the rest)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
          sinks: torch.Tensor | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    gqa = q.shape[1] != k.shape[1]
    # Autocast does not cover FlexAttention: QK-norm may hand over fp32 q/k beside a bf16 v.
    q, k = q.to(v.dtype), k.to(v.dtype)
    if sinks is None:
        return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    out, aux = fn(q, k, v, block_mask=block_mask, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    # softmax with exp(sink) in the denominator = plain softmax * Z / (Z + e^sink), Z = exp(lse).
    keep = torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1))
    return (out * keep.unsqueeze(-1).to(out.dtype)).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_learnable, frozen=cfg.qk_norm_frozen)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_learnable, frozen=cfg.qk_norm_frozen)
        # Sinks start at 0: exp(0) = 1 "virtual key" of weight comparable to one real key.
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sinks else None
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | BlockMask | None = None, cache: KVCache | None = None) -> torch.Tensor:
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

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
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

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
            dropout: float) -> torch.Tensor:
        """Pair i's value is value heads 2i and 2i+1 side by side; each half is attended separately.

        Queries [q1, q1, q2, q2] over keys [k1, k1, k2, k2] and values [v_even, v_odd, v_even, v_odd]
        (heads concatenated; GQA maps query group j to key/value group j) give both maps times
        both halves in one call whose value width equals the query width.
        """
        q1, q2, k1, k2 = q[:, 0::2], q[:, 1::2], k[:, 0::2], k[:, 1::2]
        v_even, v_odd = v[:, 0::2], v[:, 1::2]
        out = attend(torch.cat([q1, q1, q2, q2], dim=1), torch.cat([k1, k1, k2, k2], dim=1),
                     torch.cat([v_even, v_odd, v_even, v_odd], dim=1), mask, dropout)
        o1_even, o1_odd, o2_even, o2_odd = out.chunk(4, dim=1)
        a1, a2 = torch.cat([o1_even, o1_odd], dim=-1), torch.cat([o2_even, o2_odd], dim=-1)
        out = a1 - self.lam().to(a1.dtype) * a2
        return self.subln(out) * (1 - self.lambda_init)
