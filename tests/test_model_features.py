"""Each architecture switch against a reference or a property that fails when the switch is broken."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from codefoundry.config import ConfigError, ModelConfig
from codefoundry.model import Transformer
from codefoundry.model.attention import Attention, DiffAttention, lambda_init_for
from codefoundry.model.layers import Block
from codefoundry.model.mlp import MLP
from codefoundry.model.rope import apply_rope, rope_frequencies, rope_tables
from codefoundry.train.optim import param_groups


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def tables(c: ModelConfig, t: int):
    return rope_tables(c, t)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    for kv in (1, 2):  # MQA and GQA
        gqa = Attention(cfg(n_kv_heads=kv), 0)
        mha = Attention(cfg(n_kv_heads=4), 0)
        rep = 4 // kv
        with torch.no_grad():
            mha.q_proj.weight.copy_(gqa.q_proj.weight)
            mha.o_proj.weight.copy_(gqa.o_proj.weight)
            for name in ("k_proj", "v_proj"):
                w = getattr(gqa, name).weight.view(kv, 8, 32).repeat_interleave(rep, 0).reshape(32, 32)
                getattr(mha, name).weight.copy_(w)
        x = torch.randn(2, 10, 32)
        cos, sin = tables(cfg(), 10)
        torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-5, rtol=1e-5)


def test_rope_scalings():
    plain = cfg(head_dim=16, n_heads=2)
    inv, m = rope_frequencies(plain)
    lin, _ = rope_frequencies(dataclasses.replace(plain, rope_scaling="linear", rope_factor=4.0))
    torch.testing.assert_close(lin, inv / 4)
    ntk, _ = rope_frequencies(dataclasses.replace(plain, rope_scaling="ntk", rope_factor=4.0))
    assert ntk[0] == inv[0] and torch.allclose(ntk[-1], inv[-1] / 4)  # NTK: fastest kept, slowest / factor
    yarn_cfg = dataclasses.replace(plain, rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=1024)
    yarn, mscale = rope_frequencies(yarn_cfg)
    assert yarn[0] == inv[0] and torch.allclose(yarn[-1], inv[-1] / 4)
    assert mscale == pytest.approx(0.1 * math.log(4) + 1) and m == 1.0
    with pytest.raises(ConfigError):
        cfg(rope_scaling="dynamic")


@pytest.mark.parametrize("frozen", [False, True])
def test_qk_norm_trainable_or_frozen(frozen):
    torch.manual_seed(0)
    model = Transformer(cfg(qk_norm=True, qk_norm_frozen=frozen))
    gains = [m.attn.q_norm.weight for m in model.blocks] + [m.attn.k_norm.weight for m in model.blocks]
    assert all(g.requires_grad != frozen for g in gains)
    trainable = {id(p) for group in param_groups(model).values() for p in group}
    assert all((id(g) in trainable) != frozen for g in gains)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    opt.step()
    moved = any(not torch.equal(g, torch.ones_like(g)) for g in gains)
    assert moved != frozen


def test_qk_norm_without_gains():
    model = Transformer(cfg(qk_norm=True, norm_learnable=False))
    assert model.blocks[0].attn.q_norm.weight is None and model.norm.weight is None
    assert all(p.dim() >= 2 for p in model.parameters())  # no norm parameters at all


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_norm_placement(placement):
    """Post-norm normalises the branch output: with the MLP branch zeroed, out - x has unit RMS."""
    torch.manual_seed(0)
    block = Block(cfg(norm_placement=placement), 0)
    torch.nn.init.zeros_(block.mlp.down_proj.weight)
    x = torch.randn(2, 8, 32) * 3
    cos, sin = tables(cfg(), 8)
    rms = (block(x, cos, sin) - x).pow(2).mean(-1).sqrt()
    is_unit = torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    assert is_unit == (placement == "post")


def test_smooth_swiglu_equals_swiglu_with_bounded_down_input(monkeypatch):
    torch.manual_seed(0)
    smooth, plain = MLP(cfg(mlp="smooth_swiglu")), MLP(cfg(mlp="swiglu"))
    plain.load_state_dict(smooth.state_dict())
    x = torch.randn(4, 8, 32) * 5
    torch.testing.assert_close(smooth(x), plain(x), atol=1e-5, rtol=1e-4)
    inputs = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda inp, w, b=None: inputs.append(inp) or linear(inp, w, b))
    smooth(x)
    down_in = inputs[-1]  # the down projection is the last matmul
    assert down_in.shape[-1] == smooth.down_proj.in_features
    torch.testing.assert_close(down_in.flatten(0, -2).abs().amax(0), torch.ones(down_in.shape[-1]))


@pytest.mark.parametrize("kind,fn", [("relu2", lambda u: F.relu(u).square()), ("gelu", F.gelu)])
def test_single_matrix_mlps(kind, fn):
    torch.manual_seed(0)
    mlp = MLP(cfg(mlp=kind))
    assert mlp.gate_proj is None and mlp.up_proj.out_features == 4 * 32
    x = torch.randn(3, 32)
    torch.testing.assert_close(mlp(x), mlp.down_proj(fn(mlp.up_proj(x))))


def test_logit_softcap_bounds_logits():
    torch.manual_seed(0)
    model = Transformer(cfg(logit_softcap=3.0, init_std=1.0))
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.abs().max() < 3.0 and logits.abs().max() > 2.5


def test_z_loss_adds_mean_squared_log_partition():
    torch.manual_seed(0)
    model = Transformer(cfg(z_loss=1e-2, init_std=0.5))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    y[0, :4] = -100
    model.eval()
    plain = model(x, y)
    lse = model(x).logsumexp(-1)[y != -100]
    model.train()
    torch.testing.assert_close(model(x, y) - plain, 1e-2 * lse.square().mean(), atol=1e-5, rtol=1e-4)
    chunked = Transformer(dataclasses.replace(model.cfg, loss_chunk=8))
    chunked.load_state_dict(model.state_dict())
    torch.testing.assert_close(chunked(x, y), model(x, y))
    assert set(model.extra_metrics()) == {"z_loss"}


@pytest.mark.parametrize("scaled", [False, True])
def test_depth_scaled_init(scaled):
    torch.manual_seed(0)
    model = Transformer(cfg(dim=256, n_heads=4, n_layers=8, depth_scaled_init=scaled))
    o_std = model.blocks[0].attn.o_proj.weight.std().item()
    q_std = model.blocks[0].attn.q_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / math.sqrt(16) if scaled else 0.02, rel=0.05)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 16))
    model = Transformer(cfg(dropout=0.2))
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    no_drop = Transformer(cfg())
    torch.testing.assert_close(no_drop(x), no_drop(x))


def test_tied_and_untied_embeddings():
    tied, untied = Transformer(cfg()), Transformer(cfg(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


def test_attention_sinks():
    """A very negative sink is plain attention; a dominant sink absorbs all the attention mass."""
    torch.manual_seed(0)
    sink_attn, plain = Attention(cfg(attn_sinks=True), 0), Attention(cfg(), 0)
    plain.load_state_dict({k: v for k, v in sink_attn.state_dict().items() if k != "sinks"})
    x = torch.randn(2, 10, 32)
    cos, sin = tables(cfg(), 10)
    with torch.no_grad():
        sink_attn.sinks.fill_(-1e4)
        torch.testing.assert_close(sink_attn(x, cos, sin), plain(x, cos, sin), atol=1e-5, rtol=1e-5)
        sink_attn.sinks.fill_(1e4)
        assert sink_attn(x, cos, sin).abs().max() < 1e-6
    sink_attn.sinks.data.zero_()
    sink_attn(x, cos, sin).sum().backward()
    assert sink_attn.sinks.grad is not None and sink_attn.sinks.grad.abs().sum() > 0


def test_diff_attention_lambda_schedule_and_zero_lambda_reference():
    c = cfg(diff_attn=True)
    assert lambda_init_for(0) == pytest.approx(0.2) and lambda_init_for(5) == pytest.approx(0.8 - 0.6 * math.exp(-1.5))
    torch.manual_seed(0)
    attn = DiffAttention(c, 3)
    attn.lambda_init = 0.0
    with torch.no_grad():
        attn.lambda_q2.copy_(attn.lambda_q1)
        attn.lambda_k2.copy_(attn.lambda_k1)
        attn.subln.weight.uniform_(0.5, 1.5)
    assert float(attn.lam().detach()) == 0.0
    b, t, d = 2, 9, 8
    x = torch.randn(b, t, 32)
    cos, sin = tables(c, t)
    q = attn.q_proj(x).view(b, t, 4, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, 2, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, 2, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Standard softmax attention of the first map only: q heads 0, 2 over k head 0 with V = v heads 0|1.
    q1, k1 = q[:, 0::2], k[:, 0:1]
    v_wide = torch.cat([v[:, 0:1], v[:, 1:2]], dim=-1)
    scores = (q1 @ k1.transpose(-2, -1)) / math.sqrt(d)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    heads = scores.softmax(-1) @ v_wide
    heads = F.rms_norm(heads, (2 * d,), attn.subln.weight, c.norm_eps)
    expected = attn.o_proj(heads.transpose(1, 2).reshape(b, t, 32))
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=1e-5)
    assert attn.o_proj.weight.numel() == Attention(c, 0).o_proj.weight.numel()


def test_diff_attention_needs_even_heads():
    with pytest.raises(ConfigError):
        cfg(diff_attn=True, n_kv_heads=1)


def test_document_mask_isolates_packed_documents():
    torch.manual_seed(0)
    doc_a, doc_b = [0, 5, 6, 7, 8, 9], [0, 11, 12, 13, 14]
    packed = torch.tensor([doc_a + doc_b])
    alone = torch.tensor([doc_b])
    masked = Transformer(cfg(doc_mask=True)).eval()
    plain = Transformer(cfg()).eval()
    plain.load_state_dict(masked.state_dict())
    torch.testing.assert_close(masked(packed)[:, len(doc_a):], masked(alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(packed)[:, len(doc_a):], plain(alone), atol=1e-3)
    torch.testing.assert_close(masked(packed)[:, :len(doc_a)], plain(packed)[:, :len(doc_a)])


def test_document_mask_with_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = Transformer(cfg(doc_mask=True)).eval()
    seq = torch.tensor([[0, 3, 4, 5, 0, 7, 8, 0, 9, 10, 11]])
    full = model(seq)
    cache = model.new_cache(1, 16)
    parts = [model(seq[:, :3], cache=cache)]
    for i in range(3, seq.shape[1]):
        parts.append(model(seq[:, i:i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_document_mask_with_left_padded_batch_generation():
    """Padding is id 0 (= the separator): masked keys must keep padded rows identical to unpadded ones."""
    from codefoundry.infer.generate import generate_tokens

    torch.manual_seed(0)
    model = Transformer(cfg(doc_mask=True)).eval()
    prompts = [[0, 3, 4, 0, 7, 8, 9, 10], [0, 5, 6]]
    batched = torch.stack(list(generate_tokens(model, prompts, 6)), dim=1).tolist()
    single = [[int(t) for t in generate_tokens(model, [p], 6)] for p in prompts]
    assert batched == single
