"""Training-only runtime choices: compile, MFU peak, linear-layer precision, activation checkpointing.

(Device, dtype and threads, which every stage needs, are in :mod:`codefoundry.runtime`.)"""

from __future__ import annotations

import functools

import torch

from codefoundry.errors import UserError

# Dense bf16 peak FLOP/s used for MFU, by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def use_compile(setting: str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda"
    if setting not in ("on", "off"):
        raise UserError(f"train.compile={setting!r}: use auto, on or off")
    return setting == "on"


LINEAR_PRECISIONS = ("default", "fp8-tensorwise", "fp8-rowwise", "tcfp12")


def apply_linear_precision(model: torch.nn.Module, name: str, device: torch.device) -> None:
    """Convert the model's linear layers to FP8 (torchao) or TCFP-12 before the optimizer is built."""
    if name == "default":
        return
    if name.startswith("fp8-"):
        from codefoundry.train.fp8 import convert_to_fp8

        convert_to_fp8(model, name.removeprefix("fp8-"), device)
    elif name == "tcfp12":
        from codefoundry.train.tcfp import convert_to_tcfp12

        convert_to_tcfp12(model)
    else:
        raise UserError(f"train.linear_precision={name!r}: use one of {', '.join(LINEAR_PRECISIONS)}")


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of storing its activations.

    The blocks' ``forward`` is wrapped in place, so parameter names and checkpoints are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
