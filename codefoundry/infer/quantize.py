"""Post-training weight-only quantization (int8 per-channel, int4 group-wise) via torchao.

``quantize_model(model, "int8" | "int4")`` swaps the weights of every linear layer inside
the transformer blocks for torchao quantized tensors in place; activations stay in the
model's float dtype, so generation, bits-per-byte and serving run unchanged on the result.
The embedding and (tied) LM head stay in full precision: they are one shared matrix, the
most sensitive one, and quantizing the head alone would untie it and cost memory instead.

torchao configs used, chosen because they run on CPU as well as CUDA (checked with torchao
0.18; its ``Int4WeightOnlyConfig`` packings need CUDA/XPU kernels or the ``mslk`` library):

* int8: ``Int8WeightOnlyConfig`` — symmetric, one scale per output channel.
* int4: ``IntxWeightOnlyConfig(torch.int4, PerGroup(group_size))`` — symmetric, one scale per
  ``group_size`` input weights. On CPU the 4-bit values are held one per int8 byte and
  dequantized on the fly: it measures int4's accuracy faithfully, but saves memory only
  against fp32 (4x, like int8), not the 8x a packed CUDA kernel gives.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from codefoundry.errors import UserError
from codefoundry.infer.load import SCHEMES
from codefoundry.model import Transformer

DEFAULT_GROUP_SIZE = 32


def _torchao_config(scheme: str, group_size: int):
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise UserError("weight quantization needs torchao: pip install 'codefoundry[quant]'") from None
    if scheme == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def block_linears(model: Transformer) -> list[tuple[str, nn.Linear]]:
    """The linear layers quantization applies to: those inside the blocks, except MoE routers
    (tiny, and a rounding error there changes which experts run, not just how much)."""
    return [(name, m) for name, m in model.named_modules()
            if name.startswith("blocks.") and isinstance(m, nn.Linear) and not name.endswith(".router")]


def quantize_model(model: Transformer, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> Transformer:
    """Quantize ``model``'s block weights in place (``scheme`` "none" is a no-op); returns it."""
    if scheme in ("none", "", None):
        return model
    if scheme not in SCHEMES:
        raise UserError(f"--quantize {scheme}: use one of none, {', '.join(SCHEMES)}")
    layers = block_linears(model)
    if scheme == "int4":
        odd = [name for name, m in layers if m.in_features % group_size]
        if odd:
            raise UserError(f"int4 group size {group_size} does not divide the input width of {odd[0]} "
                            f"({dict(layers)[odd[0]].in_features}); pick a group size that does")
    from torchao.quantization import quantize_

    targets = {id(m) for _, m in layers}
    quantize_(model, _torchao_config(scheme, group_size), filter_fn=lambda m, _: id(m) in targets)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, counting quantized tensors by their stored parts."""
    total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = [t for a in ("qdata", "scale", "zero_point") if isinstance(t := getattr(p, a, None), torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in parts) if parts else p.numel() * p.element_size()
    return total
