"""FP8 training through ``torchao.float8`` (tensorwise or rowwise scaling recipes).

Only GPUs with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) gain
from it; anywhere else it is refused with a clear message rather than silently emulated.
torchao is imported lazily and lives in the ``fp8`` extra.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from codefoundry.errors import UserError

RECIPES = ("tensorwise", "rowwise")


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def convert_to_fp8(model: nn.Module, recipe: str, device: torch.device) -> int:
    """Swap the model's linear layers (not the LM head) for torchao Float8Linear; returns how many."""
    if recipe not in RECIPES:
        raise UserError(f"fp8 recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    if not fp8_supported(device):
        raise UserError(f"train.linear_precision=fp8-{recipe} needs a CUDA GPU with FP8 (compute capability >= 8.9); "
                        f"this run is on {device}: use train.linear_precision=default")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("FP8 training needs torchao: pip install 'codefoundry[fp8]'") from None

    def eligible(module: nn.Module, fqn: str) -> bool:  # FP8 GEMMs need dims divisible by 16
        return fqn != "lm_head" and isinstance(module, nn.Linear) and \
            module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=eligible)
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")
