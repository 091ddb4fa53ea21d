"""TCFP-12: a two-level block floating-point format, 12.5 bits per value.

Per block of 32 consecutive values (along the last dimension, which is the reduction
dimension of the matmuls that consume them):

    S      power-of-two block scale, so the block's max |x| / S fits E4M3 (<= 448)
    x_hi   = fp8_e4m3(x / S)                       8 bits / value
    r      = x / S - dequant(x_hi)                 what E4M3 rounded away
    S_r    power-of-two residual scale, so max |r| / S_r fits int4 (<= 7)
    x_lo   = int4(r / S_r)                         4 bits / value
    x     ~= S * (dequant(x_hi) + S_r * x_lo)

plus two 8-bit exponents per block: 12 + 16/32 = 12.5 bits per value. The residual adds
about three mantissa bits to E4M3's three where they matter most (the block's largest
values), so reconstruction error sits far below plain E4M3 at 40% less memory than bf16.

:class:`TCFPLinear` trains "born quantized": from step 0 its matmuls see TCFP-12 weights and
activations (and, optionally, gradients with stochastic rounding) while the master weights
stay in full precision and gradients pass straight through the rounding. Weight block
scales can be *delayed*: taken from an EMA of past block amaxes rather than the current
one, so scales stay stable step to step (values beyond the delayed range saturate).

Where the GPU has FP8 tensor cores and Triton is installed, the forward GEMM runs on the codes
themselves (:mod:`codefoundry.train.tcfp_triton`: FP8 MMAs with per-block scale promotion).
Everywhere else, and for the two backward GEMMs, the format is emulated in PyTorch (quantize,
then dequantize for the matmul): exact about the numerics, runs anywhere, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 32
E4M3_MAX = 448.0
INT4_MIN, INT4_MAX = -8, 7
BITS_PER_VALUE = 8 + 4 + 2 * 8 / BLOCK


@dataclass
class TCFP12:
    """A quantized tensor: codes plus per-block exponents (scale = 2**exp)."""

    hi: torch.Tensor  # float8_e4m3fn, (rows, blocks, BLOCK)
    lo: torch.Tensor  # int8 holding int4 codes in [-8, 7], same shape
    scale_exp: torch.Tensor  # int8, (rows, blocks, 1)
    residual_exp: torch.Tensor  # int8, (rows, blocks, 1)
    shape: torch.Size  # original shape (the last dim is padded to a multiple of BLOCK)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, ceil(n / BLOCK), BLOCK) in fp32, zero-padded."""
    x = x.float().reshape(-1, x.shape[-1])
    pad = -x.shape[-1] % BLOCK
    if pad:
        x = F.pad(x, (0, pad))
    return x.view(x.shape[0], -1, BLOCK)


def block_amax(x: torch.Tensor) -> torch.Tensor:
    """Per-block max |x|, shaped (rows, blocks, 1): what the block scale is chosen from."""
    return _blocks(x).abs().amax(-1, keepdim=True)


def _pow2_exponent(amax: torch.Tensor, limit: float) -> torch.Tensor:
    """Smallest e with amax / 2**e <= limit (all-zero blocks get the smallest exponent)."""
    e = torch.ceil(torch.log2(amax.clamp_min(2.0 ** -120) / limit))
    return e.clamp(-127, 127)


def _round(x: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not stochastic:
        return torch.round(x)
    noise = torch.rand(x.shape, device=x.device, generator=generator)
    return torch.floor(x + noise)  # unbiased: E[floor(x + U)] = x


def quantize(x: torch.Tensor, stochastic: bool = False, amax: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> TCFP12:
    """TCFP-12 codes for ``x``; ``amax`` (rows, blocks, 1) overrides the live block amax (delayed scaling)."""
    xb = _blocks(x)
    scale_exp = _pow2_exponent(xb.abs().amax(-1, keepdim=True) if amax is None else amax, E4M3_MAX)
    scaled = (xb * torch.exp2(-scale_exp)).clamp(-E4M3_MAX, E4M3_MAX)  # clamp: saturate, never NaN
    hi = scaled.to(torch.float8_e4m3fn)
    residual = scaled - hi.float()
    residual_exp = _pow2_exponent(residual.abs().amax(-1, keepdim=True), INT4_MAX)
    lo = _round(residual * torch.exp2(-residual_exp), stochastic, generator).clamp(INT4_MIN, INT4_MAX)
    return TCFP12(hi, lo.to(torch.int8), scale_exp.to(torch.int8), residual_exp.to(torch.int8), x.shape)


def dequantize(q: TCFP12, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s, s_r = torch.exp2(q.scale_exp.float()), torch.exp2(q.residual_exp.float())
    xb = s * (q.hi.float() + s_r * q.lo.float())
    n = q.shape[-1]
    return xb.reshape(xb.shape[0], -1)[:, :n].reshape(q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, stochastic: bool = False, amax: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded through TCFP-12, in ``x``'s dtype."""
    return dequantize(quantize(x, stochastic, amax), x.dtype)


def fp8_blockwise(x: torch.Tensor) -> torch.Tensor:
    """The baseline TCFP-12 improves on: the same power-of-two block scales, E4M3 codes only."""
    xb = _blocks(x)
    s = torch.exp2(_pow2_exponent(xb.abs().amax(-1, keepdim=True), E4M3_MAX))
    deq = (xb / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
    return deq.reshape(deq.shape[0], -1)[:, :x.shape[-1]].reshape(x.shape)


class _TCFPMatmul(torch.autograd.Function):
    """y = q(x) @ q(w)^T with straight-through gradients; the backward matmuls reuse the
    quantized operands and (optionally) a TCFP-12 copy of the output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, w_amax: torch.Tensor | None,
                quantize_grad: bool, stochastic: bool) -> torch.Tensor:
        from codefoundry.train import tcfp_triton

        if tcfp_triton.available(x.device):
            codes_x, codes_w = quantize(x), quantize(weight, amax=w_amax)
            y = tcfp_triton.tcfp12_matmul(codes_x, codes_w).view(*x.shape[:-1], weight.shape[0]).to(x.dtype)
            xq, wq = dequantize(codes_x, x.dtype), dequantize(codes_w, weight.dtype)
        else:
            xq, wq = fake_quantize(x), fake_quantize(weight, amax=w_amax)
            y = xq @ wq.t()
        ctx.save_for_backward(xq, wq)
        ctx.quantize_grad, ctx.stochastic = quantize_grad, stochastic
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xq, wq = ctx.saved_tensors
        g = fake_quantize(grad_out, stochastic=ctx.stochastic) if ctx.quantize_grad else grad_out
        grad_x = g @ wq.to(g.dtype)
        grad_w = g.reshape(-1, g.shape[-1]).t() @ xq.reshape(-1, xq.shape[-1]).to(g.dtype)
        return grad_x.to(xq.dtype), grad_w.to(wq.dtype), None, None, None


class TCFPLinear(nn.Linear):
    """nn.Linear whose matmul runs on TCFP-12 operands (same parameters and state-dict keys)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, delayed_scaling: bool = True,
                 amax_decay: float = 0.9, quantize_grad: bool = True, stochastic_rounding: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.delayed_scaling, self.amax_decay = delayed_scaling, amax_decay
        self.quantize_grad, self.stochastic_rounding = quantize_grad, stochastic_rounding
        # EMA of the weight's block amaxes; not persistent, so checkpoints stay plain nn.Linear.
        self.register_buffer("w_amax", torch.zeros(0), persistent=False)

    def _weight_amax(self) -> torch.Tensor | None:
        """The delayed block amax to scale with now, then fold the current amax into the EMA."""
        if not self.delayed_scaling:
            return None
        with torch.no_grad():
            live = block_amax(self.weight)
            if self.w_amax.numel() == 0:
                self.w_amax = live
            used = self.w_amax.clone()
            if self.training:
                self.w_amax.lerp_(live, 1 - self.amax_decay)
        return used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _TCFPMatmul.apply(x, self.weight, self._weight_amax(), self.quantize_grad, self.stochastic_rounding)
        return y + self.bias if self.bias is not None else y


def convert_to_tcfp12(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), **options) -> int:
    """Swap every nn.Linear (except names in ``skip``) for a TCFPLinear sharing its parameters.

    Call before building the optimizer. The (tied) LM head stays in full precision, as is
    usual for low-precision training. Returns the number of layers converted.
    """
    converted = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not nn.Linear or full in skip:
                continue
            layer = TCFPLinear(child.in_features, child.out_features, child.bias is not None, device="meta", **options)
            layer.weight, layer.bias = child.weight, child.bias
            layer.w_amax = torch.zeros(0, device=child.weight.device)
            setattr(parent, name, layer)
            converted += 1
    return converted


def effective_mantissa_bits(x: torch.Tensor, approx: torch.Tensor) -> float:
    """Mantissa bits a format behaves like on ``x``, measured against bf16 (7 explicit bits) as a
    ruler: each halving of the relative RMS error counts one bit."""
    def rel(y: torch.Tensor) -> torch.Tensor:
        return (y.float() - x.float()).norm() / x.float().norm()
    return 7.0 + torch.log2(rel(x.bfloat16()) / rel(approx)).item()
