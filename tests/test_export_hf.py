"""HF transformers export: the exported directory loads with no custom code and computes our logits."""

from __future__ import annotations

import json

import pytest
import torch
from test_export_common import CODE, CONVERSATIONS, assert_logits_close, code_ids, make_checkpoint, tiny_config

from codefoundry.cli import main
from codefoundry.export.hf import hf_config, rope_parameters
from codefoundry.infer.generate import generate_tokens
from codefoundry.model import Transformer
from codefoundry.tokenizer.chat import render_chat

transformers = pytest.importorskip("transformers")

CASES = {
    "llama": {},
    "qwen3-yarn": {"qk_norm": True, "rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_len": 64},
    "arcee-relu2-untied-bias-ntk": {"mlp": "relu2", "bias": True, "tie_embeddings": False,
                                    "rope_scaling": "ntk", "rope_factor": 2.0},
    "exaone4-postnorm-frozen-qknorm": {"norm_placement": "post", "qk_norm": True, "qk_norm_frozen": True,
                                       "mlp": "smooth_swiglu", "rope_scaling": "linear", "rope_factor": 2.0},
    "glm4moe-groups-shared": {"n_experts": 4, "ffn_dim": 96, "moe_groups": 2, "moe_shared_experts": 2,
                              "tie_embeddings": False, "norm_learnable": False, "mtp_heads": 1},
}


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_our_logits(tiny_tokenizer, tmp_path, name):
    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path, **CASES[name])
    args = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert main(args) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = code_ids(tok)
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)


@pytest.mark.parametrize("scaling", ["linear", "ntk", "yarn"])
def test_rope_scaling_reproduces_our_tables(tiny_tokenizer, scaling):
    tok, _ = tiny_tokenizer
    cfg = tiny_config(tok.vocab_size, rope_scaling=scaling, rope_factor=4.0, rope_original_max_len=64)
    ours = Transformer(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(cfg, tok))
    cos, sin = hf.model.rotary_emb(torch.zeros(1), torch.arange(cfg.max_seq_len)[None])
    assert torch.allclose(cos[0], ours.rope_cos.repeat(1, 2), atol=1e-6)
    assert torch.allclose(sin[0], ours.rope_sin.repeat(1, 2), atol=1e-6)
    expected_type = {"linear": "linear", "ntk": "default", "yarn": "longrope"}[scaling]
    assert rope_parameters(cfg)["rope_type"] == expected_type


def test_greedy_generation_matches_through_the_kv_cache(tiny_tokenizer, tmp_path):
    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path, init_std=0.2)
    main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = tok.encode("def parse(text):\n    ")
    ours = torch.stack(list(generate_tokens(model, [prompt], 24))).squeeze(-1).tolist()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.special_ids["<|fim_pad|>"])[0, len(prompt):].tolist()
    assert ours == theirs


def test_hf_tokenizer_encodes_like_ours_and_carries_the_chat_template(tiny_tokenizer, tmp_path):
    tok, tok_path = tiny_tokenizer
    make_checkpoint(tmp_path / "ckpt", tok_path)
    main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (CODE, CODE[:1000].replace("    ", "\t"), "x = 'héllo' + \"wörld\"  # 123456\r\n"):
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.bos_token_id == tok.eot_id and hf_tok.eos_token_id == tok.eot_id
    for messages in CONVERSATIONS[1:3]:
        ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(ids) == render_chat(tok, messages, True).ids
    meta = json.loads((tmp_path / "hf" / "codefoundry.json").read_text())
    assert meta["model"]["vocab_size"] == tok.vocab_size


def test_unexportable_model_leaves_no_output_and_one_line(tiny_tokenizer, tmp_path, capsys):
    _, tok_path = tiny_tokenizer
    make_checkpoint(tmp_path / "ckpt", tok_path, logit_softcap=15.0)
    code = main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and "soft-capping" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
