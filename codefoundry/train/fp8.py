"""FP8 training through ``torchao.float8`` (tensorwise or rowwise scaling recipes).

Only GPUs with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) gain
from it; anywhere else it is refused with a clear message rather than silently emulated
(``emulate=True`` is for tests: torchao's emulation runs the same casts with ordinary matmuls).
torchao is imported lazily and lives in the ``fp8`` extra.

Which layers: :func:`fp8_eligible` is the one rule, checked for every preset by the tests.
FP8 GEMMs need both dimensions of the weight divisible by 16; the token dimension, which is
the *inner* dimension of the weight-gradient GEMM, need not be: MTP heads see B·(T-1) rows
and packed SFT batches any count, so ``pad_inner_dim`` pads it (a no-op when it divides).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from codefoundry.errors import UserError

RECIPES = ("tensorwise", "rowwise")


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Linear layers FP8 applies to: not the LM head (kept in high precision, as is usual), not the
    routed experts (they run as grouped GEMMs in bf16 and their modules are never called), and
    only weights whose two dimensions are multiples of 16 (the router, with a handful of outputs, is not)."""
    if fqn == "lm_head" or ".experts." in f".{fqn}." or not isinstance(module, nn.Linear):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_fp8(model: nn.Module, recipe: str, device: torch.device, emulate: bool = False) -> int:
    """Swap the model's eligible linear layers for torchao Float8Linear; returns how many."""
    if recipe not in RECIPES:
        raise UserError(f"fp8 recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    if not emulate and not fp8_supported(device):
        raise UserError(f"train.linear_precision=fp8-{recipe} needs a CUDA GPU with FP8 (compute capability >= 8.9); "
                        f"this run is on {device}: use train.linear_precision=default")
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model, config=fp8_config(recipe, emulate), module_filter_fn=fp8_eligible)
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")


def fp8_config(recipe: str, emulate: bool = False):
    """torchao's config for ``recipe``, with the weight-gradient GEMM's inner (token) dim padded."""
    try:
        from torchao.float8 import Float8LinearConfig
    except ImportError:
        raise UserError("FP8 training needs torchao: pip install 'codefoundry[fp8]'") from None
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), pad_inner_dim=True, emulate=emulate)
