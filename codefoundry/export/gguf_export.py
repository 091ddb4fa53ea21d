"""Export a checkpoint as one GGUF file that llama.cpp (and everything built on it) runs.

The architecture is the one the HF export picks (llama / qwen3 / qwen2 / arcee; its post-norm and
MoE families are refused here, see :mod:`codefoundry.export.hf`), and tensor names come from
``gguf``'s own HF -> GGUF name map, so the two exports cannot drift apart. What differs from
the HF export:

* **RoPE layout.** llama.cpp's ``llama`` and ``arcee`` graphs rotate interleaved pairs
  (2i, 2i+1) — the original Meta layout — while our tables pair i with i + head_dim/2. Q
  and K rows are permuted exactly as llama.cpp's ``convert_hf_to_gguf.py`` does. ``qwen3``
  and ``qwen2`` use the NeoX (rotate-half) mode, so its weights go in unchanged.
* **RoPE scaling.** linear -> ``rope.scaling.type=linear``; static NTK -> a larger
  ``rope.freq_base``; YaRN and Llama 3.1's llama3 (llama arch only) -> a ``rope_freqs`` tensor
  holding our exact per-dimension frequency divisors (how llama.cpp runs Llama 3.1's scaling),
  with YaRN's attention temperature folded into the Q projection (RoPE is linear, so scaling
  q by m² equals scaling q and k by m).
* **Tokenizer.** byte-level BPE as ``gpt2`` with pre-tokenizer ``llama-bpe`` (our split
  regex is exactly Llama 3's), tokens, types (special tokens are CONTROL), merges, the
  special / FIM ids and the chat template (an imported model's own, else ours). No BOS is added:
  our prompts carry none, and templates that want one print it.

Tensors: 1-D ones (norms, biases) stay F32 as in llama.cpp's converter; matrices are
F32/F16/BF16, or Q8_0/Q4_0/Q4_1 packed by ``gguf.quants`` (rows whose length is not a multiple of
the 32-wide block fall back to F16, counted). The 4-bit types keep the embedding (and the output
head, tied to it or not) at Q8_0: it is the matrix most sensitive to rounding, which is why
``llama-quantize`` keeps it at higher precision too and our own int4 inference gives it int8.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codefoundry.config import ModelConfig
from codefoundry.errors import UserError
from codefoundry.export.hf import (
    ExportPlan,
    chat_template,
    hf_state_dict,
    pad_id,
    plan_export,
    token_id_of,
    training_notes,
)
from codefoundry.model import Transformer
from codefoundry.model.rope import (
    default_inv_freq,
    ntk_theta,
    rope_active,
    rope_frequencies,
)
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer import special as sp

# Architectures whose llama.cpp graph uses interleaved ("normal") RoPE and so needs Q/K permuted.
INTERLEAVED_ROPE = {"llama", "arcee"}
PRE_TOKENIZER = "llama-bpe"  # llama.cpp's name for Llama 3's pre-tokenizer, whose regex is this one:
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1")  # packed in blocks of 32 along a row by gguf.quants
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")  # kept at Q8_0 by the 4-bit types
GGUF_ARCHES = ("llama", "qwen3", "qwen2", "arcee")  # of the HF export's families, those mapped here
PER_DIM_SCALINGS = ("yarn", "llama3")  # written as a rope_freqs tensor of per-dimension divisors


@dataclass
class GGUFSummary:
    path: Path
    plan: ExportPlan
    tensors: int
    f16_fallbacks: int  # Q8_0 requested but a row length was not a multiple of the block size


def permute_for_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from rotate-half pairs (i, i+d/2) to interleaved pairs (2i, 2i+1).

    The same reshape as ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``;
    works for weights (rows, in) and biases (rows,).
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(plan: ExportPlan, cfg: ModelConfig) -> str:
    """The llama.cpp architecture for a model the HF export maps to ``plan.model_type``."""
    arch = plan.model_type
    if arch not in GGUF_ARCHES:
        raise UserError(f"cannot export to GGUF: the {arch} mapping (post-norm or MoE) is not implemented for "
                        "llama.cpp here; use the hf format")
    if arch == "arcee" and cfg.mlp != "relu2":
        raise UserError(f"cannot export to GGUF: model.mlp={cfg.mlp} has no llama.cpp architecture "
                        "(its arcee graph is ReLU² only); use the hf format")
    if arch == "arcee" and cfg.bias:
        raise UserError("cannot export to GGUF: model.bias with a ReLU² MLP (arcee): llama.cpp's arcee graph has no "
                        "output-projection or MLP biases and refuses the file; use the hf format")
    if rope_active(cfg) and cfg.rope_scaling in PER_DIM_SCALINGS and arch != "llama":
        raise UserError(f"cannot export to GGUF: {cfg.rope_scaling} rope scaling is only mapped for the llama "
                        f"architecture (this model is {arch}); use the hf format")
    return arch


def gguf_tensors(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """GGUF-named fp32 tensors, Q/K permuted and RoPE scaling applied as the module docstring says."""
    import gguf

    cfg = model.cfg
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.TensorNameMap(arch_enum, cfg.n_layers)
    q_scale = 1.0
    out: dict[str, torch.Tensor] = {}
    if rope_active(cfg) and cfg.rope_scaling in PER_DIM_SCALINGS:
        inv_freq, mscale = rope_frequencies(cfg)
        out["rope_freqs.weight"] = (default_inv_freq(cfg) / inv_freq.double()).float()
        q_scale = mscale ** 2
    for name, tensor in hf_state_dict(model, arch).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        tensor = tensor.detach().float()
        if ".self_attn.q_proj." in name:
            tensor = tensor * q_scale
            if arch in INTERLEAVED_ROPE:
                tensor = permute_for_interleaved_rope(tensor, cfg.n_heads)
        elif ".self_attn.k_proj." in name and arch in INTERLEAVED_ROPE:
            tensor = permute_for_interleaved_rope(tensor, cfg.n_kv_heads)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"internal export mapping error: gguf has no {arch} name for {name}")
        out[new] = tensor
    return out


def control_token_ids(tokenizer: CodeTokenizer) -> set[int]:
    """Ids of the added special tokens (ours, and any an imported tokenizer brought along)."""
    return {i for i, t in tokenizer.tk.get_added_tokens_decoder().items() if t.special}


def check_llama_bpe(tokenizer: CodeTokenizer) -> None:
    """Refuse unless llama.cpp's ``llama-bpe`` tokenization is provably the same as ours.

    Same pipeline: byte-level BPE, no normalizer, a single Split on Llama 3's regex then
    ByteLevel. And ``llama-bpe`` turns on ``ignore_merges`` (a piece that is a whole vocabulary
    entry becomes that token without running merges), which only changes results for an entry
    the merges cannot rebuild; so every non-special entry must come back from the merges as
    itself.
    """
    spec = json.loads(tokenizer.tk.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    split_regex = steps[0].get("pattern", {}).get("Regex") if kinds == ["Split", "ByteLevel"] else None
    if spec["model"].get("type") != "BPE" or spec.get("normalizer") or split_regex != LLAMA3_SPLIT_PATTERN:
        raise UserError("cannot export to GGUF: the tokenizer is not byte-level BPE with Llama 3's split regex, "
                        "so no llama.cpp pre-tokenizer reproduces it")
    specials = control_token_ids(tokenizer)
    vocab = tokenizer.tk.get_vocab(with_added_tokens=False)
    unreachable = [t for t, i in vocab.items()
                   if i not in specials and [x.id for x in tokenizer.tk.model.tokenize(t)] != [i]]
    if unreachable:
        raise UserError(f"cannot export to GGUF: {len(unreachable)} vocabulary entries (e.g. {unreachable[0]!r}) are "
                        "not rebuilt by their merges, so llama.cpp's ignore_merges would tokenize differently")


def add_tokenizer(writer, tokenizer: CodeTokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, the role ids the tokenizer has, and its chat template (its own or ours)."""
    import gguf

    specials = control_token_ids(tokenizer)
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.tk.id_to_token(i)
        if token is None:  # embedding rows beyond the tokenizer (padding) never occur in text
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
    merges = json.loads(tokenizer.tk.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    ids = tokenizer.special_ids
    writer.add_bos_token_id(token_id_of(tokenizer, tokenizer.config.bos_token))
    writer.add_eos_token_id(token_id_of(tokenizer, tokenizer.config.eos_token))
    if sp.ASSISTANT_END in ids:
        writer.add_eot_token_id(ids[sp.ASSISTANT_END])
    writer.add_pad_token_id(pad_id(tokenizer))
    for role, key in ((sp.FIM_PREFIX, gguf.Keys.Tokenizer.FIM_PRE_ID), (sp.FIM_SUFFIX, gguf.Keys.Tokenizer.FIM_SUF_ID),
                      (sp.FIM_MIDDLE, gguf.Keys.Tokenizer.FIM_MID_ID), (sp.FIM_PAD, gguf.Keys.Tokenizer.FIM_PAD_ID)):
        if role in ids:
            writer.add_uint32(key, ids[role])
    writer.add_add_bos_token(False)  # templates (ours, Llama 3's) print their own BOS
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template(tokenizer))


def add_hparams(writer, model: Transformer) -> None:
    import gguf

    cfg = model.cfg
    writer.add_name("codefoundry")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    theta = cfg.rope_theta
    if rope_active(cfg) and cfg.rope_scaling == "ntk":
        theta = ntk_theta(cfg)
    elif rope_active(cfg) and cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_factor)
    writer.add_rope_freq_base(theta)


def encode_tensor(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, object, bool]:
    """(data, raw GGML type or None, fell back to F16) for one tensor in the requested type."""
    import gguf

    data = tensor.numpy()
    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), None, False
    if dtype == "f16":
        return data.astype(np.float16), None, False
    if dtype in BLOCK_TYPES and name in EMBEDDING_TENSORS:
        dtype = "q8_0"
    kind = gguf.GGMLQuantizationType[dtype.upper()]
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return data.astype(np.float16), None, True
    return gguf.quants.quantize(data, kind), kind, False


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "f16") -> GGUFSummary:
    """Write ``out`` (a .gguf file) from a checkpoint directory; written to a temporary name first,
    so a failure never leaves a truncated file behind."""
    import gguf

    from codefoundry.checkpoint import load_model

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)} for the gguf format")
    model, tokenizer = load_model(checkpoint, "cpu")
    cfg = model.cfg
    plan = plan_export(cfg)
    plan.notes += training_notes(checkpoint)
    arch = gguf_arch(plan, cfg)
    check_llama_bpe(tokenizer)
    tensors = gguf_tensors(model, arch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    add_hparams(writer, model)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    add_tokenizer(writer, tokenizer, cfg.vocab_size)
    fallbacks = 0
    for name, tensor in tensors.items():
        data, raw_dtype, fell_back = encode_tensor(name, tensor, dtype)
        fallbacks += fell_back
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return GGUFSummary(out, plan, len(tensors), fallbacks)
