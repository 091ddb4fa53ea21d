"""Weight-only int8 / int4 quantization: the grids, the packed CPU layers, the right layers swapped,
and a small bits-per-byte cost."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_export_common import code_ids, random_model, tiny_config

from codefoundry.checkpoint import load_model
from codefoundry.data.shards import Shard, ShardWriter
from codefoundry.errors import UserError
from codefoundry.eval.bpb import bits_per_byte
from codefoundry.infer.generate import generate_tokens
from codefoundry.infer.load import load_for_inference
from codefoundry.infer.quantize import (
    Int4Linear,
    Int8Linear,
    PackedLinear,
    block_linears,
    int4_weights,
    int8_weights,
    quantize_model,
    weight_bytes,
)
from codefoundry.recipes import build_run_config
from codefoundry.train.trainer import pretrain


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_data, tmp_path_factory):
    """The tiny preset trained briefly on real code: weights with real structure to round."""
    out = tmp_path_factory.mktemp("quant-run")
    overrides = [f"train.data={tiny_data}", f"train.out={out}", "train.max_steps=60", "train.seq_len=64",
                 "train.batch_size=8", "train.warmup_steps=5", "train.lr=3e-3", "train.log_every=60"]
    summary = pretrain(build_run_config("tiny", None, overrides), show_progress=False)
    return summary["checkpoint"]


def test_int8_and_int4_grids_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.rand(48, 1)  # rows of different ranges
    q, scale = int8_weights(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (48,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    q4, scale4, zero = int4_weights(w, 32)
    assert q4.min() == 0 and q4.max() == 15 and scale4.shape == zero.shape == (48, 4)
    step = scale4.repeat_interleave(32, dim=1)
    deq = (q4 - 8) * step + zero.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [48, 40])  # 40: int4 packs rows in 16s, so the layer pads and slices
def test_packed_layers_compute_their_grid_weights(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, rows)
    x = torch.randn(2, 3, 128)
    q, scale = int8_weights(linear.weight.detach())
    q4, scale4, zero = int4_weights(linear.weight.detach(), 32)
    grids = {Int8Linear(linear): q.float() * scale[:, None],
             Int4Linear(linear, 32): ((q4 - 8) * scale4.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1))}
    for layer, w in grids.items():
        ref = F.linear(x, w, linear.bias)
        out = layer(x)
        assert out.shape == (2, 3, rows) and out.dtype == torch.float32
        assert (out - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 activations and scales


def test_quantize_swaps_block_linears_and_head_keeps_routers_and_embedding(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    model = random_model(tiny_config(tok.vocab_size, n_experts=2, ffn_dim=64, moe_groups=1))
    names = [name for name, _ in block_linears(model)]
    embed = model.embed.weight.detach().clone()
    fp_bytes = weight_bytes(model)
    quantize_model(model, "int4")
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], Int4Linear) for n in names)
    assert isinstance(model.lm_head, Int8Linear)  # the head: int8 in both schemes
    assert type(model.blocks[0].mlp.router.weight) is torch.nn.Parameter  # routers stay exact
    assert torch.equal(model.embed.weight, embed)
    assert weight_bytes(model) < fp_bytes


def test_quantized_model_generates_and_stays_close(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    model = random_model(tiny_config(tok.vocab_size, init_std=0.02))
    ids = code_ids(tok, 64)
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, "int8")
        assert (model(ids) - ref).abs().max() < 0.05 * ref.abs().max()
    out = list(generate_tokens(model, [ids[0].tolist(), ids[0, :10].tolist()], 8))
    assert len(out) == 8 and out[0].shape == (2,)


def test_bad_scheme_and_group_size_are_one_line_errors(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    model = random_model(tiny_config(tok.vocab_size))
    with pytest.raises(UserError, match="use one of none, int8, int4"):
        quantize_model(model, "int3")
    with pytest.raises(UserError, match="group size 48 does not divide"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(UserError, match="the CPU kernel takes one of"):
        quantize_model(model, "int4", group_size=16)
    assert quantize_model(model, "none") is model
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_torchao_backend_for_other_devices_quantizes_on_its_grid(tiny_tokenizer):
    """The path GPUs take (torchao tensor subclasses), exercised on CPU."""
    pytest.importorskip("torchao")
    from codefoundry.infer.quantize import _quantize_with_torchao

    tok, _ = tiny_tokenizer
    model = random_model(tiny_config(tok.vocab_size))
    layers = block_linears(model)
    before = {name: m.weight.detach().clone() for name, m in layers}
    _quantize_with_torchao(model, layers, "int4", 32)
    for name, m in layers:
        w = m.weight
        assert w.qdata.min() >= -8 and w.qdata.max() <= 7, name
        step = w.scale.repeat_interleave(32, dim=1)
        assert ((w.dequantize() - before[name]).abs() <= step / 2 + 1e-6).all(), name


@pytest.fixture(scope="module")
def small_val(tiny_data, tiny_tokenizer, tmp_path_factory):
    """The first held-out documents as a shard of their own: enough signal, a fraction of the time."""
    tok, _ = tiny_tokenizer
    val = Shard(tiny_data / "val")
    docs = [val.document(i) for i in range(min(6, len(val)))]
    out = tmp_path_factory.mktemp("small-val")
    writer = ShardWriter(out, tok.vocab_size)
    for doc in docs:
        writer.add(doc)
    writer.close({"bytes": sum(len(tok.decode(d[1:].tolist()).encode()) for d in docs), "vocab_size": tok.vocab_size})
    return out


def test_bits_per_byte_cost_int8_within_1_percent_int4_within_5(trained_checkpoint, small_val):
    model, _ = load_model(trained_checkpoint)
    base = bits_per_byte(model, small_val, seq_len=128, dtype=torch.bfloat16)["bpb"]
    costs = {}
    for scheme in ("int8", "int4"):
        quantized, _ = load_for_inference(trained_checkpoint, "cpu", "fp32", scheme)
        costs[scheme] = bits_per_byte(quantized, small_val, seq_len=128)["bpb"] / base - 1
    print(f"bpb bf16 {base:.4f}; int8 {costs['int8']:+.2%}, int4 {costs['int4']:+.2%}")
    assert base < 6.0  # the model learned something, so rounding has structure to damage
    assert abs(costs["int8"]) < 0.01
    assert abs(costs["int4"]) < 0.05


def test_quantize_flag_reaches_eval_and_generate(trained_checkpoint, tiny_data, capsys):
    from codefoundry.cli import main

    assert main(["eval", "bpb", "--checkpoint", str(trained_checkpoint), "--data", str(tiny_data / "val"),
                 "--seq-len", "128", "--device", "cpu", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert 0 < json.loads(out[out.index("{"):])["bpb"] < 8
    assert main(["generate", "--checkpoint", str(trained_checkpoint), "--prompt", "def ", "--temperature", "0",
                 "--max-new-tokens", "8", "--device", "cpu", "--quantize", "int4"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_chat_agent_and_serve_load_quantized(trained_checkpoint):
    from codefoundry.cli import build_parser
    from codefoundry.infer.load import load_from_args

    for command in ("chat", "serve"):
        args = build_parser().parse_args([command, "--checkpoint", str(trained_checkpoint), "--device", "cpu",
                                          "--quantize", "int8"])
        model, _ = load_from_args(args)
        assert all(isinstance(m, Int8Linear) for m in model.modules() if isinstance(m, PackedLinear)), command
        assert isinstance(model.blocks[0].attn.q_proj, Int8Linear), command
