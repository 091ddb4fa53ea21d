"""LoRA through peft: only adapter weights train, adapters save alone, and the merge equals base + adapter."""

from __future__ import annotations

import pytest
import torch

from codefoundry.config import ModelConfig
from codefoundry.errors import UserError
from codefoundry.model import Transformer

peft = pytest.importorskip("peft")

from codefoundry.post.lora import (  # noqa: E402
    apply_lora,
    load_adapter,
    lora_layers,
    merge_adapter_checkpoint,
    merge_lora,
    parse_lora_spec,
    save_adapter,
)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))


def test_parse_lora_spec():
    spec = parse_lora_spec("r=4,alpha=8,targets=q_proj,v_proj,down_proj,dropout=0.1")
    assert (spec.r, spec.alpha, spec.dropout, spec.targets) == (4, 8.0, 0.1, ["q_proj", "v_proj", "down_proj"])
    assert len(parse_lora_spec("r=2,targets=all-linear").targets) == 7 and parse_lora_spec("r=2").alpha == 4.0
    for bad in ("r=0", "targets=qkv", "rank=4", "r=four", "q_proj"):
        with pytest.raises(UserError):
            parse_lora_spec(bad)


def test_only_adapters_train_and_merge_equals_base_plus_adapter(tmp_path):
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(tiny_model(), "r=4,alpha=8,targets=q_proj,v_proj,up_proj")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # A and B, three targets, two layers
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    for _ in range(3):
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    lora_state = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in before.items():  # base weights untouched (peft keeps them under .base_layer)
        key = key if key in lora_state else key.replace(".weight", ".base_layer.weight")
        assert torch.equal(lora_state[key], value), key
    adapted = model.blocks[0].attn.q_proj
    assert float(adapted.lora_B["default"].weight.detach().abs().max()) > 0  # B starts at zero: it moved
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path / "adapter")
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"), device="cpu")
    assert saved and all("lora_" in k for k in saved)  # adapters only, no base weights

    a, b = adapted.lora_A["default"].weight, adapted.lora_B["default"].weight
    manual = before["blocks.0.attn.q_proj.weight"] + (8 / 4) * b @ a
    merged = merge_lora(model)
    assert type(merged.blocks[0].attn.q_proj) is torch.nn.Linear
    assert set(merged.state_dict()) == set(before)  # a plain checkpoint again
    torch.testing.assert_close(merged.blocks[0].attn.q_proj.weight, manual)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)

    reloaded = merge_lora(load_adapter(tiny_model(), tmp_path / "adapter"))  # adapters re-apply on their own
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)


def test_adapter_that_does_not_fit_is_refused(tmp_path):
    save_adapter(apply_lora(tiny_model(), "r=2,targets=q_proj"), tmp_path / "a")
    other = Transformer(ModelConfig(vocab_size=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    with pytest.raises(UserError, match="does not fit this model"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(UserError, match="not a LoRA adapter directory"):
        load_adapter(tiny_model(), tmp_path / "nothing")


def test_adapter_merges_into_a_plain_checkpoint(tmp_path):
    from codefoundry.checkpoint import load_model, save_checkpoint
    from helpers_post import tiny_tokenizer_path

    base = tiny_model()
    save_checkpoint(tmp_path / "base", base, tiny_tokenizer_path(), preset="test")
    model = apply_lora(tiny_model(), "r=2,targets=all-linear")
    with torch.no_grad():
        for _, layer in lora_layers(model):  # B starts at zero: give the adapters something to merge
            layer.lora_B["default"].weight.normal_(0, 0.1)
        x = torch.randint(0, 64, (1, 12))
        expected = model(x)
    save_adapter(model, tmp_path / "adapter")
    merge_adapter_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
