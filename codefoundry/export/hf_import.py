"""Import a Llama-family transformers checkpoint into our checkpoint format (the HF export, inverted).

Supported: ``llama``, ``qwen3`` and ``arcee`` — exactly the architectures the export writes —
with default or linear RoPE. Anything our model cannot reproduce exactly (other RoPE types
such as Llama 3.1's ``llama3``, sliding windows, biases on only some projections) is refused
in one line, never imported approximately.

Tokenizer: the HF directory's ``tokenizer.json`` is used as is. Our pipeline needs its
special tokens (EOT separates documents; FIM, chat and tool tokens), so any that are missing
are **appended** as new special tokens and the embedding (and untied head) grows by one row
each, initialised to the mean of the existing rows: the imported model's predictions on the
original vocabulary are unchanged, and continued pretraining or SFT then learns the new
tokens. A model without ``tokenizer.json`` (slow tokenizer only) is refused.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from codefoundry.config import ModelConfig
from codefoundry.errors import UserError
from codefoundry.export.hf import ARCHITECTURES, hf_name
from codefoundry.model import Transformer
from codefoundry.tokenizer import special as sp

IMPORTABLE = ("llama", "qwen3", "arcee")
ACTIVATION_TO_MLP = {"silu": "swiglu", "relu2": "relu2", "gelu": "gelu"}


def model_config_from_hf(hf_cfg) -> ModelConfig:
    """Our ModelConfig for a transformers config; one-line UserError if it cannot be exact."""
    model_type = hf_cfg.model_type
    if model_type not in IMPORTABLE:
        raise UserError(f"cannot import model_type {model_type!r}: supported are {', '.join(IMPORTABLE)}")
    problems = []
    accepted = set(ARCHITECTURES[model_type][1].values())
    mlp = ACTIVATION_TO_MLP.get(hf_cfg.hidden_act)
    if hf_cfg.hidden_act not in accepted:
        problems.append(f"hidden_act={hf_cfg.hidden_act!r} (our {model_type} mapping takes "
                        f"{', '.join(sorted(accepted))})")
    rope = dict(hf_cfg.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        problems.append(f"rope_type={rope_type!r} has no exact equivalent here (default and linear import)")
    attention_bias = bool(getattr(hf_cfg, "attention_bias", False))
    mlp_bias = bool(getattr(hf_cfg, "mlp_bias", False))
    if attention_bias != mlp_bias:
        problems.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (our model.bias covers both)")
    if getattr(hf_cfg, "use_sliding_window", False):
        problems.append("sliding-window attention is not implemented here")
    if problems:
        raise UserError(f"cannot import this {model_type} checkpoint exactly: " + "; ".join(problems))
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    return ModelConfig(
        vocab_size=hf_cfg.vocab_size, dim=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads, n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
        head_dim=head_dim, ffn_dim=hf_cfg.intermediate_size, mlp=mlp, max_seq_len=hf_cfg.max_position_embeddings,
        norm_eps=hf_cfg.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling="none" if rope_type == "default" else "linear", rope_factor=float(rope.get("factor", 1.0)),
        qk_norm=model_type == "qwen3", tie_embeddings=bool(hf_cfg.tie_word_embeddings), bias=attention_bias,
    )


def tokenizer_with_specials(hf_dir: Path):
    """The directory's tokenizer with our special tokens added; returns (tokenizer, tokens added)."""
    from tokenizers import AddedToken, Tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json; save the tokenizer with transformers "
                        "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR)) and import again")
    tk = Tokenizer.from_file(str(path))
    missing = [t for t in sp.SPECIAL_TOKENS if tk.token_to_id(t) is None]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tk, missing


def grow_rows(weight: torch.Tensor, rows: int, new_ids: list[int]) -> torch.Tensor:
    """``weight`` padded to ``rows``; rows of new tokens set to the mean of the original ones."""
    out = torch.cat([weight, weight.new_zeros(max(0, rows - weight.shape[0]), weight.shape[1])])
    if new_ids:
        out[new_ids] = weight.mean(dim=0)
    return out


def load_hf_weights(hf_dir: Path, cfg: ModelConfig) -> Transformer:
    """Our model with the HF weights, matched name for name (any leftover is an error)."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model = Transformer(cfg)
    ours = {hf_name(k): k for k in model.state_dict()}
    state = hf_model.state_dict()
    unexpected = [k for k in state if k not in ours]
    missing = [k for k in ours if k not in state]
    if unexpected or missing:
        raise UserError(f"cannot import {hf_dir}: weights {unexpected[:3]} have no place in our model, "
                        f"{missing[:3]} are missing")
    model.load_state_dict({ours[k]: v for k, v in state.items()})
    return model.eval()


def import_hf(hf_dir: str | Path, out: str | Path) -> dict:
    """Write our checkpoint directory ``out`` from a transformers model directory."""
    from transformers import AutoConfig

    from codefoundry.checkpoint import save_checkpoint

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a transformers model directory (no config.json)")
    hf_cfg = AutoConfig.from_pretrained(str(hf_dir))
    cfg = model_config_from_hf(hf_cfg)
    tk, added = tokenizer_with_specials(hf_dir)
    model = load_hf_weights(hf_dir, cfg)
    if added:
        new_ids = [tk.token_to_id(t) for t in added]
        rows = max(cfg.vocab_size, max(new_ids) + 1)
        grown = Transformer(dataclasses.replace(cfg, vocab_size=rows))
        state = model.state_dict()
        state["embed.weight"] = grow_rows(state["embed.weight"], rows, new_ids)
        state["lm_head.weight"] = (state["embed.weight"] if cfg.tie_embeddings
                                   else grow_rows(state["lm_head.weight"], rows, new_ids))
        grown.load_state_dict(state)
        model = grown.eval()
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        tk.save(str(tok_path))
        save_checkpoint(out, model, tok_path, preset=f"hf-import:{hf_cfg.model_type}")
    return {"out": str(out), "model_type": hf_cfg.model_type, "added_tokens": added,
            "vocab_size": model.cfg.vocab_size}
