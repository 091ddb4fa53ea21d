"""TCFP-12's fast forward GEMM: a Triton kernel on FP8 tensor cores with per-block scale promotion.

For one 32-wide block of the reduction dimension, with x ~ S_x (h_x + r_x l_x) and likewise w
(:mod:`codefoundry.train.tcfp`: E4M3 codes h, int4 codes l, power-of-two scales S and r):

    x . w = S_x S_w [ h_x.h_w + r_w (h_x.l_w) + r_x (l_x.h_w) + r_x r_w (l_x.l_w) ]

Every dot product is an FP8 x FP8 MMA (int4 codes are exact in E4M3) accumulated in fp32; the
block's scales are applied to the fp32 partial sums ("promoted") before they join the
accumulator, so the result is the product of the dequantised operands up to fp32 summation
order. It needs a GPU with FP8 (compute capability >= 8.9) and the ``triton`` package; its
numerics are checked on CPU under ``TRITON_INTERPRET=1`` (tests/test_train_tcfp.py).
"""

from __future__ import annotations

import torch

from codefoundry.train.tcfp import BLOCK, TCFP12

try:
    import triton
    import triton.language as tl
except ImportError:  # the emulated path in train/tcfp.py needs nothing of this
    triton = None


def available(device: torch.device) -> bool:
    """True where the kernel runs at speed: Triton present and a CUDA GPU with FP8 tensor cores."""
    if triton is None or device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)  # (torch.compile folds this one to a constant)
    return (props.major, props.minor) >= (8, 9)


if triton is not None:
    @triton.jit
    def _tcfp12_matmul_kernel(xh, xl, xs, xr, wh, wl, ws, wr, y, M, N, K, KB,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(KB):
            x_off = rm[:, None] * K + kb * BLOCK_K + rk[None, :]  # (BLOCK_M, BLOCK_K)
            w_off = rn[None, :] * K + kb * BLOCK_K + rk[:, None]  # (BLOCK_K, BLOCK_N): w transposed
            x_hi = tl.load(xh + x_off, mask=m_ok[:, None], other=0.0)
            x_lo = tl.load(xl + x_off, mask=m_ok[:, None], other=0.0)
            w_hi = tl.load(wh + w_off, mask=n_ok[None, :], other=0.0)
            w_lo = tl.load(wl + w_off, mask=n_ok[None, :], other=0.0)
            sx = tl.exp2(tl.load(xs + rm * KB + kb, mask=m_ok, other=0).to(tl.float32))
            rx = tl.exp2(tl.load(xr + rm * KB + kb, mask=m_ok, other=0).to(tl.float32))
            sw = tl.exp2(tl.load(ws + rn * KB + kb, mask=n_ok, other=0).to(tl.float32))
            rw = tl.exp2(tl.load(wr + rn * KB + kb, mask=n_ok, other=0).to(tl.float32))
            part = tl.dot(x_hi, w_hi, out_dtype=tl.float32)
            part += tl.dot(x_hi, w_lo, out_dtype=tl.float32) * rw[None, :]
            part += tl.dot(x_lo, w_hi, out_dtype=tl.float32) * rx[:, None]
            part += tl.dot(x_lo, w_lo, out_dtype=tl.float32) * (rx[:, None] * rw[None, :])
            acc += part * (sx[:, None] * sw[None, :])
        tl.store(y + rm[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def tcfp12_matmul(x: TCFP12, w: TCFP12, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """fp32 ``dequantize(x) @ dequantize(w).T`` for codes of x (M, K) and w (N, K), from the codes."""
    if triton is None:
        raise RuntimeError("the TCFP-12 kernel needs the triton package")
    m, n, kb = x.hi.shape[0], w.hi.shape[0], x.hi.shape[1]
    if w.hi.shape[1] != kb:
        raise ValueError(f"reduction blocks differ: {kb} vs {w.hi.shape[1]}")
    k = kb * BLOCK

    def operands(q: TCFP12) -> tuple[torch.Tensor, ...]:
        # int4 codes as E4M3 (exact): the MMA takes both operands in FP8.
        return (q.hi.reshape(-1, k).contiguous(), q.lo.reshape(-1, k).to(torch.float8_e4m3fn).contiguous(),
                q.scale_exp.reshape(-1, kb).contiguous(), q.residual_exp.reshape(-1, kb).contiguous())

    y = torch.empty(m, n, dtype=torch.float32, device=x.hi.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _tcfp12_matmul_kernel[grid](*operands(x), *operands(w), y, m, n, k, kb,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK)
    return y
