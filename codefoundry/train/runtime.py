"""Device, precision and thread settings resolved from the config's 'auto' values."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from codefoundry.errors import UserError

# Dense bf16 peak FLOP/s used for MFU, by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"train.dtype={name!r}: use auto, fp32, bf16 or fp16")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision around the forward pass; a no-op in fp32 (weights stay fp32 always)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


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
