"""`codefoundry import --from hf`: Llama-family transformers checkpoints become ours, logits unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_export_common import assert_logits_close, code_ids, make_checkpoint

from codefoundry.checkpoint import load_model
from codefoundry.cli import main
from codefoundry.errors import UserError
from codefoundry.export.hf_import import import_hf
from codefoundry.tokenizer import special as sp

transformers = pytest.importorskip("transformers")


def randomize_(model) -> None:
    """Norm gains and biases away from their init, so a mapping mistake shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)


BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.08,
            tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
ARCHS = {  # name -> (transformers classes, config overrides, what our config must say)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
              {"rope_theta": 5e5}),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE},
                 {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 32}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None, "head_dim": 16}, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, {"qkv_bias": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}, {"qk_norm": True, "head_dim": 32}),
}


def random_hf(out, vocab_size: int, arch: str = "llama", **overrides):
    config_cls, model_cls, arch_overrides, _ = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**{**BASE, "vocab_size": vocab_size, **arch_overrides, **overrides})
    model = getattr(transformers, model_cls)(cfg).eval()
    randomize_(model)
    model.save_pretrained(out)
    return model


def random_hf_llama(out, vocab_size: int, **overrides):
    return random_hf(out, vocab_size, "llama", **overrides)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_random_tiny_models_import_with_identical_logits(tiny_tokenizer, tmp_path, arch):
    tok, tok_path = tiny_tokenizer
    hf = random_hf(tmp_path / "hf", tok.vocab_size, arch)
    shutil.copy(tok_path, tmp_path / "hf" / "tokenizer.json")
    assert main(["import", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    model, loaded_tok = load_model(tmp_path / "ckpt")
    for key, value in ARCHS[arch][3].items():
        assert getattr(model.cfg, key) == value, key
    assert loaded_tok.encode("def f(): pass") == tok.encode("def f(): pass")
    ids = code_ids(tok, 200)  # longer than llama3's original 32 positions: all three frequency bands matter
    with torch.no_grad():
        assert_logits_close(hf(ids).logits, model(ids), tol=1e-5)


def test_sharded_checkpoint_imports_tensor_by_tensor(tiny_tokenizer, tmp_path):
    tok, tok_path = tiny_tokenizer
    hf = random_hf(tmp_path / "one", tok.vocab_size, "qwen2")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    shutil.copy(tok_path, tmp_path / "hf" / "tokenizer.json")
    model, _ = load_model(import_hf(tmp_path / "hf", tmp_path / "ckpt")["out"])
    ids = code_ids(tok)
    with torch.no_grad():
        assert_logits_close(hf(ids).logits, model(ids), tol=1e-5)


def test_import_inverts_the_export(tiny_tokenizer, tmp_path):
    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path, qk_norm=True, rope_scaling="linear", rope_factor=2.0)
    main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    import_hf(tmp_path / "hf", tmp_path / "back")
    back, _ = load_model(tmp_path / "back")
    assert back.cfg == model.cfg.__class__(**{**model.cfg.__dict__, "init_std": back.cfg.init_std})
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_tokenizer_without_our_special_tokens_gets_them_appended(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = random_hf_llama(tmp_path / "hf", bare.get_vocab_size(), tie_word_embeddings=True)
    bare.save(str(tmp_path / "hf" / "tokenizer.json"))
    result = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert result["added_tokens"] == list(sp.SPECIAL_TOKENS)
    model, tok = load_model(tmp_path / "ckpt")
    old = bare.get_vocab_size()
    assert model.cfg.vocab_size == old + len(sp.SPECIAL_TOKENS) and tok.eot_id >= old
    new_rows = model.embed.weight[old:]
    assert torch.allclose(new_rows, hf.model.embed_tokens.weight.mean(0).expand_as(new_rows))
    ids = torch.tensor([tok.encode("def f(x):\n    return x + 1\n")])
    with torch.no_grad():
        assert_logits_close(hf(ids).logits, model(ids)[..., :old], tol=1e-5)


def test_checkpoints_we_cannot_reproduce_exactly_are_refused(tiny_tokenizer, tmp_path):
    tok, tok_path = tiny_tokenizer
    random_hf(tmp_path / "hf", tok.vocab_size, "mistral", sliding_window=16)
    shutil.copy(tok_path, tmp_path / "hf" / "tokenizer.json")
    with pytest.raises(UserError, match="sliding-window attention \\(window 16\\)"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    yarn = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "rope_parameters": yarn}))
    with pytest.raises(UserError, match="rope_type='dynamic'"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="cannot import model_type 'gpt2'"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
