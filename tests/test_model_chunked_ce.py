"""Chunked cross-entropy (gradients formed in the forward pass) equals the plain full-logits loss."""

import dataclasses

import pytest
import torch

from codefoundry.config import ModelConfig
from codefoundry.model import Transformer


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64, loss_chunk=-1,
                init_std=0.3)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("features", [dict(), dict(z_loss=1e-2), dict(logit_softcap=2.0, z_loss=1e-3),
                                      dict(tie_embeddings=False, mtp_heads=1)])
def test_chunked_loss_and_gradients_equal_the_full_logits(features):
    torch.manual_seed(0)
    plain = Transformer(cfg(**features))
    chunked = Transformer(dataclasses.replace(plain.cfg, loss_chunk=7))  # 2 x 15 rows: uneven chunks
    chunked.load_state_dict(plain.state_dict())
    x, y = torch.randint(0, 96, (2, 15)), torch.randint(0, 96, (2, 15))
    y[0, :4] = -100
    results = []
    for model in (plain, chunked):
        loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)
    if "z_loss" in features:
        torch.testing.assert_close(chunked.loss_parts["z_loss"], plain.loss_parts["z_loss"])


def test_chunked_loss_under_bf16_autocast_and_in_eval():
    torch.manual_seed(0)
    plain = Transformer(cfg(z_loss=1e-3))
    chunked = Transformer(dataclasses.replace(plain.cfg, loss_chunk=8))
    chunked.load_state_dict(plain.state_dict())
    x, y = torch.randint(0, 96, (2, 15)), torch.randint(0, 96, (2, 15))
    grads = []
    for model in (plain, chunked):
        with torch.autocast("cpu", torch.bfloat16):
            model(x, y).backward()
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=2e-2, rtol=5e-2)
    for model in (plain, chunked):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(chunked(x, y), plain(x, y), atol=1e-5, rtol=1e-5)
