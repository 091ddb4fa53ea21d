"""Every attention kernel equals the explicit reference (the former implementation), forward and backward.

The reference below is the O(T^2) fp32 softmax the model used before; it is kept only here,
as the oracle. FlexAttention refuses autograd on CPU in a guard meant for its compiled CPU
kernel; its eager implementation (the one CUDA falls back to uncompiled) is plain autograd
math, so the tests lift that guard to check FlexAttention's gradients here.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

from codefoundry.config import ModelConfig
from codefoundry.model import Transformer
from codefoundry.model.attention import DiffAttention, attend
from codefoundry.model.masking import (
    attention_kernel,
    attention_mask,
    block_mask,
    force_attention_kernel,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def flex_backward_on_cpu(monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


def reference(q, k, v, mask, sinks=None):
    """The former explicit attention: repeated KV heads, fp32 scores, a sink column in the softmax."""
    tq, tk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    if mask is None:
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return scores.softmax(-1).to(v.dtype) @ v
    sink = sinks.float().view(1, -1, 1, 1).expand(q.shape[0], -1, tq, 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=160, doc_sep_id=0)
    return ModelConfig(**{**base, **kw})


def packed_ids(b: int, t: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(1, 64, (b, t), generator=gen)
    idx[:, 0] = 0
    idx[0, 37], idx[0, 90], idx[1, 130] = 0, 0, 0  # documents of uneven length, one crossing a 128-tile
    return idx


def leaves(*shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def grads_of(fn, tensors):
    out = fn()
    out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
    g = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), g


@pytest.mark.parametrize("kernel", ["flex", "sdpa-masked"])
@pytest.mark.parametrize("doc_mask", [False, True])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_kernels_equal_the_reference_forward_and_backward(kernel, doc_mask, with_sinks):
    b, t = 2, 150
    c = cfg(doc_mask=doc_mask, attn_sinks=with_sinks)
    idx = packed_ids(b, t)
    q, k, v, sinks = leaves((b, 4, t, 16), (b, 2, t, 16), (b, 2, t, 16), (4,))
    sinks = sinks if with_sinks else None
    params = [q, k, v] + ([sinks] if with_sinks else [])
    dense = attention_mask(idx, c)
    mask = block_mask(idx, c) if kernel == "flex" else dense
    got, got_g = grads_of(lambda: attend(q, k, v, mask, sinks=sinks), params)
    want, want_g = grads_of(lambda: reference(q, k, v, dense, sinks), params)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for a, w in zip(got_g, want_g):
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4)


def test_decoding_with_sinks_equals_the_reference():
    """T=1 and offset-prefill queries over a longer key range (the KV-cache case)."""
    q, k, v, sinks = leaves((2, 4, 3, 16), (2, 2, 20, 16), (2, 2, 20, 16), (4,))
    mask = torch.ones(3, 20, dtype=torch.bool).tril(17)[None, None].expand(2, 1, 3, 20)
    torch.testing.assert_close(attend(q, k, v, mask, sinks=sinks), reference(q, k, v, mask, sinks), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(attend(q[:, :, -1:], k, v, None, sinks=sinks), reference(q[:, :, -1:], k, v, None, sinks),
                               atol=2e-5, rtol=1e-4)


def reference_diff_mix(attn: DiffAttention, q, k, v, mask):
    """The former differential mix: V paired into heads of twice the width."""
    b, hkv, t, d = v.shape
    v2 = v.view(b, hkv // 2, 2, t, d).permute(0, 1, 3, 2, 4).reshape(b, hkv // 2, t, 2 * d)
    a1 = reference(q[:, 0::2], k[:, 0::2], v2, mask)
    a2 = reference(q[:, 1::2], k[:, 1::2], v2, mask)
    return attn.subln(a1 - attn.lam() * a2) * (1 - attn.lambda_init)


@pytest.mark.parametrize("kernel", ["sdpa-causal", "flex", "sdpa-masked"])
def test_diff_attention_split_values_equal_the_double_width_reference(kernel):
    torch.manual_seed(0)
    c = cfg(diff_attn=True, n_heads=4, n_kv_heads=2, doc_mask=kernel != "sdpa-causal")
    attn = DiffAttention(c, 3)
    b, t = 2, 150
    idx = packed_ids(b, t)
    dense = attention_mask(idx, c)
    mask = block_mask(idx, c) if kernel == "flex" else dense
    q, k, v = leaves((b, 4, t, 16), (b, 2, t, 16), (b, 2, t, 16))
    params = [q, k, v, attn.lambda_q1]
    got, got_g = grads_of(lambda: attn.mix(q, k, v, mask, 0.0), params)
    want, want_g = grads_of(lambda: reference_diff_mix(attn, q, k, v, dense), params)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    for a, w in zip(got_g, want_g):
        torch.testing.assert_close(a, w, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("features", [dict(doc_mask=True), dict(attn_sinks=True), dict(doc_mask=True, attn_sinks=True),
                                      dict(diff_attn=True, doc_mask=True)])
def test_whole_model_loss_and_gradients_agree_across_kernels(features):
    torch.manual_seed(0)
    model = Transformer(cfg(**features))
    idx = packed_ids(2, 150)
    results = []
    for kernel in ("sdpa-masked", "flex"):
        with force_attention_kernel(kernel):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        model.zero_grad()
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_cuda_never_takes_the_math_path():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain, gqa_docs = cfg(), cfg(doc_mask=True)
    sinks, diff = cfg(attn_sinks=True), cfg(diff_attn=True)
    assert attention_kernel(plain, cuda) == "sdpa-causal"  # flash, GQA through enable_gqa
    assert attention_kernel(diff, cuda) == "sdpa-causal"  # split V: ordinary head width
    assert attention_kernel(gqa_docs, cuda) == attention_kernel(sinks, cuda) == "flex"
    # FlexAttention has no dropout: SDPA's memory-efficient kernel with a dense mask instead.
    assert attention_kernel(dataclasses.replace(gqa_docs, dropout=0.1), cuda, dropout=0.1) == "sdpa-masked"
    assert attention_kernel(gqa_docs, cpu) == "sdpa-masked"
    assert attention_kernel(sinks, cuda, decoding=True) == "sdpa-masked"
    with pytest.raises(ValueError), force_attention_kernel("math"):
        pass
