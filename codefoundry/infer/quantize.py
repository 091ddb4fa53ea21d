"""Post-training weight-only quantization for inference: int8 per channel, int4 per group.

``quantize_model(model, "int8" | "int4")`` swaps the linear layers inside the transformer
blocks for quantized ones in place; activations stay in the model's float dtype outside
them, so generation, bits-per-byte and serving run unchanged on the result. MoE routers stay
exact: they are tiny, and a rounding error there changes which experts run.

On CPU the layers run PyTorch's own packed weight-only kernels, the ones gpt-fast uses:
``_weight_int8pack_mm`` (int8 weights, one scale per output channel) and
``_weight_int4pack_mm_for_cpu`` (two 4-bit weights a byte, one scale and offset per group of
``group_size`` inputs). Both are vectorised for bf16 activations only (fp32 activations take a
scalar path ~20x slower), so a layer casts its input to bf16 and its output back. Decoding a
token reads every weight once, so it is bound by memory traffic: 1 byte (int8) or half a byte
(int4) a weight instead of fp32's 4 is where the speed comes from. For the same reason the
output head, a tied copy of the embedding and the largest matrix of a small model, gets an
int8 copy of its own (in both schemes: it is the most sensitive matrix); the embedding stays
exact, since a lookup reads one row per token.

Other devices keep torchao's tensor subclasses (``Int8WeightOnlyConfig``, and
``IntxWeightOnlyConfig`` int4 per group), which run anywhere but take a slow path on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from codefoundry.errors import UserError
from codefoundry.infer.load import SCHEMES
from codefoundry.model import Transformer

DEFAULT_GROUP_SIZE = 32
COMPUTE_DTYPE = torch.bfloat16  # the activation dtype the packed CPU kernels are vectorised for
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts


CHUNK = 1 << 20  # weights quantized per step: big temporaries would page-fault on every fresh allocation


def _row_chunks(w: torch.Tensor) -> list[slice]:
    rows = max(1, CHUNK // w.shape[1])
    return [slice(i, i + rows) for i in range(0, w.shape[0], rows)]


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(q (N, K) int8 in [-127, 127], scale (N,))``, w ~ q * scale."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], device=w.device)
    for rows in _row_chunks(w):
        part = w[rows]
        scale[rows] = s = (part.abs().amax(dim=1) / 127).clamp_(min=1e-12)
        q[rows] = part.div(s[:, None]).round_().clamp_(-127, 127)
    return q, scale


def int4_weights(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs (min..max onto 0..15, as tinygemm stores it).

    Returns ``(q (N, K) int32 in [0, 15], scale (N, K/g), zero (N, K/g))`` with
    ``w ~ (q - 8) * scale + zero``: ``zero`` is the value at the grid's middle.
    """
    n, k = w.shape
    q = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    lo, scale = (torch.empty(n, k // group_size, device=w.device) for _ in range(2))
    for rows in _row_chunks(w):
        groups = w[rows].reshape(-1, k // group_size, group_size)
        lo[rows], hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scale[rows] = s = ((hi - lo[rows]) / 15).clamp_(min=1e-6)
        q[rows] = (groups - lo[rows, :, None]).div_(s[..., None]).round_().clamp_(0, 15).reshape(-1, k)
    return q, scale, lo + 8 * scale


class PackedLinear(nn.Module):
    """A linear layer over packed low-bit weights (CPU); subclasses pack and multiply."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(PackedLinear):
    """int8 weights, one scale per output channel (``_weight_int8pack_mm``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        q, scale = int8_weights(linear.weight.detach().float())
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale.to(COMPUTE_DTYPE))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)


class Int4Linear(PackedLinear):
    """int4 weights packed two a byte, a scale and offset per group (``_weight_int4pack_mm_for_cpu``)."""

    ROWS = 16  # the packing takes output rows in multiples of this; others are zero-padded

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__(linear)
        self.group_size = group_size
        w = linear.weight.detach().float()
        if w.shape[0] % self.ROWS:
            w = torch.cat([w, w.new_zeros(-w.shape[0] % self.ROWS, w.shape[1])])
        q, scale, zero = int4_weights(w, group_size)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (groups, N, 2): the kernel's layout of (scale, zero) pairs.
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1)
                             .contiguous().to(COMPUTE_DTYPE))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales_and_zeros)
        return y if y.shape[1] == self.out_features else y[:, :self.out_features]


def block_linears(model: Transformer) -> list[tuple[str, nn.Linear]]:
    """The linear layers quantization applies to: those inside the blocks, except MoE routers
    (tiny, and a rounding error there changes which experts run, not just how much)."""
    return [(name, m) for name, m in model.named_modules()
            if name.startswith("blocks.") and isinstance(m, nn.Linear) and not name.endswith(".router")]


def check_scheme(model: Transformer, scheme: str, group_size: int) -> list[tuple[str, nn.Linear]]:
    """The layers to quantize, after checking that ``scheme`` and ``group_size`` fit them."""
    if scheme not in SCHEMES:
        raise UserError(f"--quantize {scheme}: use one of none, {', '.join(SCHEMES)}")
    layers = block_linears(model)
    if scheme == "int4":
        odd = [name for name, m in layers if m.in_features % group_size]
        if odd:
            raise UserError(f"int4 group size {group_size} does not divide the input width of {odd[0]} "
                            f"({dict(layers)[odd[0]].in_features}); pick a group size that does")
    return layers


def quantize_model(model: Transformer, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> Transformer:
    """Quantize ``model``'s block weights in place (``scheme`` "none" is a no-op); returns it."""
    if scheme in ("none", "", None):
        return model
    layers = check_scheme(model, scheme, group_size)
    if model.embed.weight.device.type != "cpu":
        return _quantize_with_torchao(model, layers, scheme, group_size)
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise UserError(f"int4 group size {group_size}: the CPU kernel takes one of {INT4_GROUP_SIZES}")
    with torch.no_grad():
        for name, linear in layers:
            parent, _, attr = name.rpartition(".")
            packed = Int8Linear(linear) if scheme == "int8" else Int4Linear(linear, group_size)
            setattr(model.get_submodule(parent), attr, packed)
        model.lm_head = Int8Linear(model.lm_head)
    return model


def _quantize_with_torchao(model: Transformer, layers: list[tuple[str, nn.Linear]], scheme: str,
                           group_size: int) -> Transformer:
    """torchao's weight-only configs, for devices without the packed CPU kernels."""
    from codefoundry.extras import require

    require("torchao.quantization")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = (Int8WeightOnlyConfig() if scheme == "int8"
              else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)))
    targets = {id(m) for _, m in layers}
    quantize_(model, config, filter_fn=lambda m, _: id(m) in targets)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights: parameters (tied ones once) and packed buffers,
    counting torchao tensors by their stored parts."""
    total = 0
    seen: set[int] = set()
    for p in [*model.parameters(), *(b for m in model.modules() if isinstance(m, PackedLinear) for b in m.buffers())]:
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = [t for a in ("qdata", "scale", "zero_point") if isinstance(t := getattr(p, a, None), torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in parts) if parts else p.numel() * p.element_size()
    return total
