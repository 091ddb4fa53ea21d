"""Rotary position embeddings with linear, NTK-aware, YaRN and Llama 3.1 ("llama3") context extension.

All four scalings only change the inverse frequencies (and, for YaRN, a logit
temperature), so they are computed once into cos/sin tables.
"""

from __future__ import annotations

import math

import torch

from codefoundry.config import ModelConfig


def rope_active(cfg: ModelConfig) -> bool:
    """Whether a context-extension scaling changes the frequencies at all."""
    return cfg.rope_scaling != "none" and cfg.rope_factor > 1


def default_inv_freq(cfg: ModelConfig, base: float | None = None) -> torch.Tensor:
    """Unscaled RoPE inverse frequencies (float64), computed the way transformers and llama.cpp do."""
    d = cfg.head_dim
    return 1.0 / ((base or cfg.rope_theta) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))


def ntk_theta(cfg: ModelConfig) -> float:
    """Static NTK-aware scaling is plain RoPE with this larger base."""
    d = cfg.head_dim
    return cfg.rope_theta * cfg.rope_factor ** (d / (d - 2))


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for each rotated pair, plus the attention scale multiplier (YaRN mscale).

    The one source of truth for RoPE: the model's tables and the HF / GGUF exports all call it.
    """
    d = cfg.head_dim
    factor = cfg.rope_factor
    base = ntk_theta(cfg) if cfg.rope_scaling == "ntk" and factor > 1 else cfg.rope_theta
    inv_freq = default_inv_freq(cfg, base)
    mscale = 1.0
    if cfg.rope_scaling == "linear" and factor > 1:
        inv_freq = inv_freq / factor
    elif cfg.rope_scaling == "yarn" and factor > 1:
        # YaRN (Peng et al. 2023): keep the dims that rotate more than beta_fast=32 times over the
        # original context, interpolate (/ factor) those rotating less than beta_slow=1 times, and
        # ramp linearly over the dim index in between; cos/sin carry the logit temperature mscale.
        # This is HF transformers' "yarn" rope_type with its defaults (truncate=True).
        def correction_dim(rotations: float) -> float:
            return d * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(32.0)), 0)
        high = min(math.ceil(correction_dim(1.0)), d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        mscale = 0.1 * math.log(factor) + 1.0
    elif cfg.rope_scaling == "llama3" and factor > 1:
        # Llama 3.1: wavelengths longer than original/low_freq_factor are interpolated (/ factor), those
        # shorter than original/high_freq_factor kept, and the band between blends the two linearly in
        # original/wavelength. transformers' "llama3" rope_type, step for step.
        original = cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original / wavelen - cfg.rope_low_freq_factor)
                  / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq.float(), mscale


def rope_tables(cfg: ModelConfig, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (length, head_dim // 2); YaRN's mscale is folded into both."""
    inv_freq, mscale = rope_frequencies(cfg)
    t = torch.arange(length, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)
    cos, sin = angles.cos() * mscale, angles.sin() * mscale
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by tables (T, D/2), pairing dim i with i + D/2 (the Llama/HF layout)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
