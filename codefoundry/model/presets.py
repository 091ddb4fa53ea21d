"""Named model presets. `codefoundry presets` lists them with parameter counts."""

from __future__ import annotations

import dataclasses
from typing import Callable

from codefoundry.config import ConfigError, ModelConfig

PRESETS: dict[str, Callable[[], ModelConfig]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        PRESETS[name] = fn
        DESCRIPTIONS[name] = description
        return fn
    return wrap


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; run `codefoundry presets` to list them")
    return dataclasses.replace(PRESETS[name]())


@register("tiny", "test-sized dense model (GQA, RoPE, SwiGLU, tied embeddings)")
def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)


@register("speedrun-cpu", "default 15-minute CPU run: small dense model tuned for 2 cores")
def _speedrun_cpu() -> ModelConfig:
    return ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512)
