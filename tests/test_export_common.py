"""Helpers shared by the export tests, and the checks of what every export format shares:
the feature guard (what is refused, what is noted) and the chat template."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from codefoundry.checkpoint import save_checkpoint
from codefoundry.config import ModelConfig
from codefoundry.data.sources import stdlib_root
from codefoundry.errors import UserError
from codefoundry.export.chat_template import CHAT_TEMPLATE
from codefoundry.export.hf import plan_export
from codefoundry.model import Transformer
from codefoundry.model.moe import MoE
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer.chat import render_chat

CODE = (stdlib_root() / "json" / "decoder.py").read_text()


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    # A larger init std than training uses: peaked attention and varied routing make any
    # mapping mistake show up far above float rounding.
    base = dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, init_std=0.08)
    return ModelConfig(**{**base, **overrides})


@torch.no_grad()
def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose biases, norm gains and MoE expert biases are all non-trivial."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.normal_(0, 0.05)
        elif p.dim() == 1 and p.requires_grad and "lambda" not in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))  # RMSNorm gains (frozen ones stay at 1)
    for m in model.modules():
        if isinstance(m, MoE):
            m.expert_bias.normal_(0, 0.05)
    return model


def make_checkpoint(path: Path, tokenizer_json: Path, seed: int = 0, **overrides) -> Transformer:
    tok = CodeTokenizer.from_file(tokenizer_json)
    model = random_model(tiny_config(tok.vocab_size, **overrides), seed)
    save_checkpoint(path, model, tokenizer_json, preset="test")
    return model


def code_ids(tok: CodeTokenizer, n: int = 160) -> torch.Tensor:
    """(1, n) token ids of real Python source."""
    return torch.tensor([tok.encode(CODE)[:n]])


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-4) -> None:
    scale = max(1.0, float(ours.abs().max()))
    err = float((ours - theirs.to(ours.dtype)).abs().max())
    assert err <= tol * scale, f"max |diff| {err:.3g} over logits of scale {scale:.3g}"


# --- the guard --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    ({}, "llama"),
    ({"qk_norm": True}, "qwen3"),
    ({"mlp": "relu2", "bias": True}, "arcee"),
    ({"norm_placement": "post", "qk_norm": True, "qk_norm_frozen": True, "mlp": "smooth_swiglu"}, "exaone4"),
    ({"n_experts": 4, "ffn_dim": 96}, "glm4_moe"),
])
def test_each_feature_set_maps_to_a_native_architecture(overrides, expected):
    assert plan_export(tiny_config(512, **overrides)).model_type == expected


@pytest.mark.parametrize("overrides, words", [
    ({"logit_softcap": 15.0}, "soft-capping"),
    ({"attn_sinks": True}, "sinks"),
    ({"diff_attn": True}, "differential attention"),
    ({"norm_placement": "post"}, "post-norm without QK-norm"),
    ({"qk_norm": True, "mlp": "gelu"}, "model.mlp=gelu"),
])
def test_features_without_native_equivalent_are_refused_in_one_line(overrides, words):
    with pytest.raises(UserError) as err:
        plan_export(tiny_config(512, **overrides))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_model_switch_the_exporter_does_not_know_is_refused():
    @dataclasses.dataclass
    class Future(ModelConfig):
        hyper_connections: int = 0

    with pytest.raises(UserError, match="hyper_connections=4 is not known to the exporter"):
        plan_export(Future(vocab_size=512, dim=64, n_heads=4, hyper_connections=4))


def test_droppable_features_come_with_notes():
    notes = plan_export(tiny_config(512, mtp_heads=1, doc_mask=True)).notes
    assert any("MTP" in n for n in notes) and any("document masking" in n for n in notes)


# --- the chat template ------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Write add(a, b)."}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "def f():\n    return 1\n"}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": "Run it."},
     {"role": "assistant", "content": "Running.", "tool_calls": [
         {"type": "function", "function": {"name": "python", "arguments": {"code": "print(1 + 1)"}}}]},
     {"role": "tool", "content": "2\n"}],
    [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]},
     {"role": "assistant", "content": None, "tool_calls": [{"name": "ls", "arguments": {}}]},
     {"role": "tool", "content": "a.py"}, {"role": "assistant", "content": "Done."}],
]


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_exactly_like_render_chat(tiny_tokenizer, messages, generation_prompt):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok, _ = tiny_tokenizer
    env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(jinja2.TemplateError(msg))
    text = env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=generation_prompt)
    specials = tok.tk.encode_special_tokens
    tok.tk.encode_special_tokens = False  # the rendered text holds control tokens as text
    try:
        ids = tok.tk.encode(text, add_special_tokens=False).ids
    finally:
        tok.tk.encode_special_tokens = specials
    assert ids == render_chat(tok, messages, generation_prompt).ids


def test_training_precision_is_noted_from_train_state(tmp_path):
    from codefoundry.export.hf import training_notes

    assert training_notes(tmp_path) == []
    torch.save({"run": {"train": {"linear_precision": "tcfp12"}}, "optimizer": {}}, tmp_path / "train_state.pt")
    assert "tcfp12" in training_notes(tmp_path)[0]
