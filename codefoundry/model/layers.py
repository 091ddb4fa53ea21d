"""Transformer building blocks: RMSNorm, attention (GQA, RoPE, QK-norm, KV cache) and MLPs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from codefoundry.config import ModelConfig
from codefoundry.model.kv_cache import KVCache
from codefoundry.model.rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, learnable: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start, key_valid = 0, None
        if cache is not None:
            start, key_valid = cache.pos, cache.key_valid
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, start, self.dropout if self.training else 0.0, key_valid)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout: float = 0.0,
           key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA where queries sit at positions start..start+Tq-1 of the Tk keys.

    ``key_valid`` (B, >=Tk) masks left-padding keys; each query may always see itself, so a
    padding row never becomes fully masked (which would put NaNs into the cache).
    """
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_valid is None:
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)
        if tq == 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa)
    qpos = torch.arange(start, start + tq, device=q.device)[:, None]
    kpos = torch.arange(tk, device=q.device)[None, :]
    mask = qpos >= kpos
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, :tk]) | (qpos == kpos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


class MLP(nn.Module):
    """SwiGLU (gate * up, SiLU), ReLU² or GELU feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        if self.kind not in ("swiglu", "relu2", "gelu"):
            raise ValueError(f"model.mlp={cfg.mlp!r}: use swiglu, relu2 or gelu")
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias)
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias) if self.kind == "swiglu" else None
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x))
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))
