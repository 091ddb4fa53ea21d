"""Cross-entropy of the LM head computed in row chunks, gradients included, in one pass.

Full-vocabulary logits for a whole batch are the largest tensor of small-model training
(8 x 2048 tokens x 49,152 x 4 bytes = 3.2 GB, and as much again for their gradient). Here
the head runs over ``chunk`` rows at a time; each chunk's softmax immediately yields the
gradients of the summed cross-entropy and of the summed squared log-partition (z-loss) with
respect to the hidden states and the head weight, and only those are kept. The backward
pass then just scales them, so unlike a checkpointed loss nothing is recomputed (the
technique of Liger-Kernel's fused linear cross-entropy, in plain PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codefoundry.tokenizer.special import IGNORE_INDEX


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, softcap: float,
                with_z: bool) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        terms = 2 if with_z else 1  # gradients kept per loss term: cross-entropy [, z-loss]
        grad_h = [torch.zeros(h.shape, dtype=torch.float32, device=h.device) for _ in range(terms)] if want_h else []
        grad_w = [torch.zeros(weight.shape, dtype=torch.float32, device=h.device) for _ in range(terms)] if want_w else []
        sums = torch.zeros(2, dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            rows, tgt = h[start:start + chunk], targets[start:start + chunk]
            raw = F.linear(rows, weight)  # bf16 under autocast: the gradient GEMMs below use the same dtype
            mm_dtype = raw.dtype
            # In-place from here on: at most two fp32 (chunk, vocab) tensors live at a time.
            logits = raw.float().div_(softcap).tanh_().mul_(softcap) if softcap > 0 else raw.float()
            del raw
            valid = (tgt != IGNORE_INDEX)[:, None]
            index = tgt.clamp(min=0)[:, None]
            lse = logits.logsumexp(dim=-1, keepdim=True)
            sums[0] += ((lse - logits.gather(1, index)) * valid).sum()
            if with_z:
                sums[1] += (lse.square() * valid).sum()
            if not (want_h or want_w):
                continue
            probs = logits.sub(lse).exp_().mul_(valid)
            # d tanh: with a soft cap, every gradient w.r.t. the raw logits carries 1 - (logits / cap)^2.
            factor = logits.div_(softcap).square_().neg_().add_(1) if softcap > 0 else None
            d_z = probs.mul(2 * lse) if with_z else None
            d_ce = probs.scatter_add_(1, index, -valid.to(probs.dtype))
            d_logits = [d_ce] if d_z is None else [d_ce, d_z]
            if factor is not None:
                for d in d_logits:
                    d.mul_(factor)
            del logits, factor
            for i, d in enumerate(d_logits):
                d = d.to(mm_dtype)
                if want_h:
                    grad_h[i][start:start + chunk] = (d @ weight.to(mm_dtype)).float()
                if want_w:
                    grad_w[i] += (d.t() @ rows.to(mm_dtype)).float()
        ctx.save_for_backward(*grad_h, *grad_w)
        ctx.terms, ctx.want = terms, (want_h, want_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return sums

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor):
        saved, terms = ctx.saved_tensors, ctx.terms
        want_h, want_w = ctx.want
        grad_h_terms = saved[:terms] if want_h else ()
        grad_w_terms = saved[terms if want_h else 0:] if want_w else ()

        def combine(parts, dtype):
            return sum(g * grad_sums[i] for i, g in enumerate(parts)).to(dtype) if parts else None
        return combine(grad_h_terms, ctx.dtypes[0]), combine(grad_w_terms, ctx.dtypes[1]), None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          softcap: float = 0.0, with_z: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, summed squared log-partition) of ``softcap(h @ weight.T)`` over rows
    ``h`` (N, dim) whose ``targets`` are not IGNORE_INDEX; the second is 0 unless ``with_z``."""
    sums = _ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk, softcap, with_z)
    return sums[0], sums[1]
