"""Import a Llama-family transformers checkpoint into our checkpoint format (the HF export, inverted).

Supported, each only where our model reproduces it exactly (a test compares logits with
transformers for each):

* ``llama`` — default, linear or Llama 3.1 ``llama3`` RoPE scaling; biases on all projections or none;
* ``mistral`` — without a sliding window (``sliding_window: null``; a window changes attention);
* ``qwen2`` — q/k/v biases (``model.qkv_bias``), no sliding window (Qwen2.5 / Qwen2.5-Coder);
* ``qwen3`` — per-head RMSNorm on q and k before RoPE (our ``model.qk_norm``);
* ``arcee`` — ReLU² / GELU MLPs (what our export writes for those).

Anything else (other RoPE types, sliding windows, biases on only some projections) is refused
in one line, never imported approximately.

Tokenizer: the directory's ``tokenizer.json`` and ``tokenizer_config.json`` are adopted as
``codefoundry tokenizer import`` adopts them: the model's own tokens play our roles (EOS,
FIM, its chat template's end of turn, tool calls), and only roles it has no token for are
appended. Each appended token gets an embedding (and untied head) row initialised to the mean
of the trained ones, so the imported model's predictions on its own vocabulary are unchanged.
The chat template travels with the checkpoint (its ``tokenizer_config.json``), so ``chat``,
``serve`` and SFT render conversations the way the model was tuned on.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from codefoundry.config import ModelConfig
from codefoundry.errors import UserError
from codefoundry.export.hf import ARCHITECTURES, hf_name
from codefoundry.model import Transformer
from codefoundry.tokenizer.pretrained import Adopted, adopt, read_hf_tokenizer

IMPORTABLE = ("llama", "mistral", "qwen2", "qwen3", "arcee")
ACTIVATION_TO_MLP = {"silu": "swiglu", "relu2": "relu2", "gelu": "gelu"}
ROPE_TYPES = ("default", "linear", "llama3")


def model_config_from_hf(hf_cfg) -> ModelConfig:
    """Our ModelConfig for a transformers config; one-line UserError if it cannot be exact."""
    model_type = hf_cfg.model_type
    if model_type not in IMPORTABLE:
        raise UserError(f"cannot import model_type {model_type!r}: supported are {', '.join(IMPORTABLE)}")
    problems = []
    accepted = set(ARCHITECTURES["arcee" if model_type == "arcee" else "llama"][1].values())
    if hf_cfg.hidden_act not in accepted:
        problems.append(f"hidden_act={hf_cfg.hidden_act!r} (the {model_type} mapping takes "
                        f"{', '.join(sorted(accepted))})")
    rope = dict(hf_cfg.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope_type={rope_type!r} has no exact equivalent here ({', '.join(ROPE_TYPES)} import)")
    bias, qkv_bias = _biases(hf_cfg, problems)
    if getattr(hf_cfg, "use_sliding_window", False) or (model_type == "mistral" and hf_cfg.sliding_window):
        problems.append(f"sliding-window attention (window {hf_cfg.sliding_window}) is not implemented here")
    if problems:
        raise UserError(f"cannot import this {model_type} checkpoint exactly: " + "; ".join(problems))
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    max_len = hf_cfg.max_position_embeddings
    return ModelConfig(
        vocab_size=hf_cfg.vocab_size, dim=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads, n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
        head_dim=head_dim, ffn_dim=hf_cfg.intermediate_size, mlp=ACTIVATION_TO_MLP[hf_cfg.hidden_act],
        max_seq_len=max_len, norm_eps=hf_cfg.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling="none" if rope_type == "default" else rope_type, rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_len=int(rope.get("original_max_position_embeddings") or max_len),
        qk_norm=model_type == "qwen3", tie_embeddings=bool(hf_cfg.tie_word_embeddings), bias=bias, qkv_bias=qkv_bias,
    )


def _biases(hf_cfg, problems: list[str]) -> tuple[bool, bool]:
    """(model.bias, model.qkv_bias) for a config; problems appended when neither reproduces it."""
    if hf_cfg.model_type == "qwen2":  # q/k/v always carry biases, o_proj and the MLP never
        return False, True
    attention_bias = bool(getattr(hf_cfg, "attention_bias", False))
    mlp_bias = bool(getattr(hf_cfg, "mlp_bias", attention_bias if hf_cfg.model_type == "arcee" else False))
    if attention_bias != mlp_bias:
        problems.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (our model.bias covers both)")
    return attention_bias, False


def load_state_into(weights: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, source: str) -> Transformer:
    """Our model holding transformers-named weights, matched name for name (any leftover is an error).

    ``weights`` is consumed one tensor at a time and copied into place (fp32), so a checkpoint read
    lazily never sits in memory beside the model: the peak is the model plus one tensor.
    """
    model = Transformer(cfg)
    targets = {hf_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
    if cfg.tie_embeddings:
        targets.pop("lm_head.weight")  # the embedding itself
    seen, unexpected = set(), []
    with torch.no_grad():
        for name, tensor in weights:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: transformers may save the shared matrix twice
            target = targets.get(name)
            if target is None:
                unexpected.append(name)
            elif target.shape != tensor.shape:
                raise UserError(f"cannot import {source}: {name} has shape {tuple(tensor.shape)}, "
                                f"the config implies {tuple(target.shape)}")
            else:
                target.copy_(tensor)
                seen.add(name)
    missing = [k for k in targets if k not in seen]
    if unexpected or missing:
        raise UserError(f"cannot import {source}: weights {unexpected[:3]} have no place in our model, "
                        f"{missing[:3]} are missing")
    return model.eval()


def hf_weights(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The directory's weights one tensor at a time: straight from safetensors (one file or an index of
    shards) when it has them, else through transformers (e.g. pytorch_model.bin)."""
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        from transformers import AutoModelForCausalLM

        yield from AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict().items()
        return
    for name in files:
        with safe_open(str(hf_dir / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)


def grow_rows(weight: torch.Tensor, rows: int, new_ids: list[int]) -> torch.Tensor:
    """``weight`` padded to ``rows``; rows of new tokens set to the mean of the original ones."""
    out = torch.cat([weight, weight.new_zeros(max(0, rows - weight.shape[0]), weight.shape[1])])
    if new_ids:
        out[new_ids] = weight.mean(dim=0)
    return out


def with_roles(model: Transformer, adopted: Adopted) -> Transformer:
    """The model with embedding (and untied head) rows for the appended role tokens."""
    new_ids = adopted.appended_ids()
    cfg = model.cfg
    rows = max(cfg.vocab_size, adopted.tokenizer.vocab_size)
    if not new_ids and rows == cfg.vocab_size:
        return model
    grown = Transformer(dataclasses.replace(cfg, vocab_size=rows))
    state = model.state_dict()
    state["embed.weight"] = grow_rows(state["embed.weight"], rows, new_ids)
    state["lm_head.weight"] = (state["embed.weight"] if cfg.tie_embeddings
                               else grow_rows(state["lm_head.weight"], rows, new_ids))
    grown.load_state_dict(state)
    return grown.eval()


def write_imported(out: str | Path, model: Transformer, adopted: Adopted, preset: str) -> dict[str, Any]:
    """Save the checkpoint (weights, tokenizer and its config) atomically; the summary import prints."""
    from codefoundry.checkpoint import save_checkpoint

    model = with_roles(model, adopted)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        adopted.tokenizer.save(tok_path)
        save_checkpoint(out, model, tok_path, preset=preset)
    return {"out": str(out), "model_type": preset.split(":")[-1], "added_tokens": adopted.appended,
            "vocab_size": model.cfg.vocab_size, "roles": adopted.report()}


def import_hf(hf_dir: str | Path, out: str | Path, append: bool = True) -> dict[str, Any]:
    """Write our checkpoint directory ``out`` from a transformers model directory."""
    from transformers import AutoConfig

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a transformers model directory (no config.json)")
    hf_cfg = AutoConfig.from_pretrained(str(hf_dir))
    cfg = model_config_from_hf(hf_cfg)
    adopted = adopt(*read_hf_tokenizer(hf_dir), append=append)
    model = load_state_into(hf_weights(hf_dir), cfg, str(hf_dir))
    return write_imported(out, model, adopted, f"hf-import:{hf_cfg.model_type}")
