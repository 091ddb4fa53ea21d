"""Training-only runtime choices: compile, MFU peak, linear-layer precision, activation checkpointing.

(Device, dtype and threads, which every stage needs, are in :mod:`codefoundry.runtime`.)"""

from __future__ import annotations

import functools

import torch

from codefoundry.errors import UserError

# Dense (non-sparse) tensor-core peaks in FLOP/s, (bf16, fp8), from NVIDIA's datasheets; the
# first entry whose key is a substring of the CUDA device name wins, so the specific names
# ("H100 NVL", "H100 PCIe", "L40S") come before the generic ones (an H100 SXM reports "H100 80GB HBM3").
# fp8 is None where the GPU has no FP8 tensor cores. GeForce/L-series: FP32 accumulation rates.
PEAK_FLOPS: dict[str, tuple[float, float | None]] = {
    "H200 NVL": (835.5e12, 1671e12),
    "H200": (989.5e12, 1979e12),
    "H100 NVL": (835.5e12, 1671e12),
    "H100 PCIe": (756.5e12, 1513e12),
    "H100": (989.5e12, 1979e12),
    "B200": (2250e12, 4500e12),
    "A100": (312e12, None),
    "L40S": (362.05e12, 733e12),
    "L40": (181.05e12, 362.05e12),
    "L4": (121e12, 242.5e12),
    "RTX 4090": (165.2e12, 330.3e12),
    "A10": (125e12, None),
}
FP8_PRECISIONS = ("fp8-tensorwise", "fp8-rowwise", "tcfp12")


def peak_flops_for_name(device_name: str, precision: str = "default") -> float | None:
    """The dense peak of the GPU called ``device_name`` for ``precision`` (a train.linear_precision):
    the FP8 peak for fp8-*/tcfp12 (whose GEMMs run on FP8 tensor cores), else bf16; None if unknown."""
    for key, (bf16, fp8) in PEAK_FLOPS.items():
        if key in device_name:
            return fp8 if precision in FP8_PRECISIONS and fp8 is not None else bf16
    return None


def peak_flops(device: torch.device, precision: str = "default") -> float | None:
    """MFU denominator for ``device`` (None on CPU or an unknown GPU); see :func:`peak_flops_for_name`."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision)


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
    The only side effects of a block's forward are the MoE load counters and aux-loss slot; under
    ``torch.compile`` they are not replayed by the recomputation (eager replay doubles every
    count alike, which changes neither the bias update's signs nor the load fractions).
    """
    from torch.utils.checkpoint import checkpoint

    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
