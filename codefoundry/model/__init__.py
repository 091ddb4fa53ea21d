"""Decoder-only transformer: attention, MLPs, RoPE, KV cache (named presets: :mod:`codefoundry.presets`)."""

from codefoundry.model.kv_cache import KVCache
from codefoundry.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
