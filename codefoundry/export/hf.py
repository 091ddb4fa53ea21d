"""Export a checkpoint as a Hugging Face transformers model directory (no custom code).

Our features map onto native transformers architectures:

================================================  ===================================
pre-norm, SwiGLU                                  ``LlamaForCausalLM``
pre-norm, SwiGLU, QK-norm (per head, before RoPE)  ``Qwen3ForCausalLM``
pre-norm, SwiGLU, biases on q/k/v only            ``Qwen2ForCausalLM``
pre-norm, ReLU² or GELU (not gated)               ``ArceeForCausalLM``
post-norm (``x + norm(f(x))``), QK-norm, SwiGLU   ``Exaone4ForCausalLM``
mixture of experts (DeepSeek-V3 routing: sigmoid   ``Glm4MoeForCausalLM``
scores, bias-corrected group-limited top-k,
normalised gates, shared experts), ± QK-norm
================================================  ===================================

Smooth-SwiGLU equals SwiGLU at inference (its per-batch rescaling cancels); RMSNorms
without gains export as gains of one; frozen QK-norm gains export as they are. MTP heads
are dropped with a note (transformers runs the trunk only). Our RoPE already pairs dim
``i`` with ``i + head_dim/2`` (HF's ``rotate_half``), so weights need no permutation. RoPE
scaling: linear -> ``linear``; static NTK -> plain RoPE with the enlarged base; YaRN ->
``longrope`` carrying our exact per-dimension factors and attention factor: the same tables as
HF's ``yarn`` with its defaults, but pinned, so no later change of ``yarn`` options
(``truncate``, ``mscale_all_dim``) in transformers can make the export silently different;
Llama 3.1's ``llama3`` -> ``llama3`` (what its runtimes know it as).

Tokenizer: its special tokens and chat template are the checkpoint's own — ours for models
trained here, the original model's for imported ones (tokenizer_config.json in the
checkpoint) — so ``apply_chat_template`` renders what ``codefoundry chat`` renders.

Anything without a native equivalent (logit soft-capping, attention sinks, differential
attention, ...) is refused in one line, never exported as a silently wrong model, and the
guard refuses any model switch this module does not know yet, so a newly added
architecture feature cannot slip through either.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codefoundry.config import ModelConfig
from codefoundry.errors import UserError
from codefoundry.export.chat_template import CHAT_TEMPLATE
from codefoundry.model import Transformer
from codefoundry.model.norm import RMSNorm
from codefoundry.model.rope import (
    default_inv_freq,
    ntk_theta,
    rope_active,
    rope_frequencies,
)
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer import special as sp

# Fields the mapping below decides on, and fields that only shape training.
MAPPED_FIELDS = {
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "mlp", "max_seq_len",
    "norm_eps", "norm_placement", "norm_learnable", "rope_theta", "rope_scaling", "rope_factor",
    "rope_original_max_len", "rope_low_freq_factor", "rope_high_freq_factor", "qk_norm", "qkv_bias",
    "qk_norm_frozen", "attn_sinks", "diff_attn", "doc_mask", "doc_sep_id",
    "tie_embeddings", "bias", "logit_softcap", "n_experts", "moe_shared_experts", "moe_top_k", "moe_groups",
    "moe_group_top_k", "mtp_heads",
}
TRAINING_ONLY_FIELDS = {"dropout", "z_loss", "init_std", "depth_scaled_init", "loss_chunk", "moe_bias_rate",
                        "moe_aux_loss", "mtp_loss_weight"}

# model_type -> (transformers class, our MLP kinds it takes -> its hidden_act).
GATED = {"swiglu": "silu", "smooth_swiglu": "silu"}
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", GATED),
    "qwen3": ("Qwen3ForCausalLM", GATED),
    "qwen2": ("Qwen2ForCausalLM", GATED),
    "arcee": ("ArceeForCausalLM", {"relu2": "relu2", "gelu": "gelu"}),
    "exaone4": ("Exaone4ForCausalLM", GATED),
    "glm4_moe": ("Glm4MoeForCausalLM", GATED),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportPlan:
    """The native architecture a config maps onto, and what the user should know about it."""

    model_type: str
    notes: list[str] = field(default_factory=list)


def plan_export(cfg: ModelConfig) -> ExportPlan:
    """Pick the architecture; one-line UserError listing every feature that has no native equivalent."""
    problems = []
    for f in dataclasses.fields(cfg):
        if f.name not in MAPPED_FIELDS | TRAINING_ONLY_FIELDS and getattr(cfg, f.name) != f.default:
            problems.append(f"model.{f.name}={getattr(cfg, f.name)!r} is not known to the exporter")
    gated, post, moe = cfg.mlp in GATED, cfg.norm_placement == "post", cfg.n_experts > 0
    if cfg.logit_softcap > 0:
        problems.append("logit soft-capping (only Gemma 2/3 cap logits, with sandwich norms we do not have)")
    if cfg.attn_sinks:
        problems.append("attention sinks (only gpt-oss has them, with its own MoE and sliding windows)")
    if cfg.diff_attn:
        problems.append("differential attention (no transformers architecture implements it)")
    if not gated and (cfg.qk_norm or post or moe):
        problems.append(f"model.mlp={cfg.mlp} together with QK-norm, post-norm or MoE (those families are SwiGLU)")
    if post and not cfg.qk_norm:
        problems.append("post-norm without QK-norm (EXAONE 4 pairs post-norm with per-head QK-norm; "
                        "OLMo 2 normalises Q/K across all heads)")
    if post and moe:
        problems.append("post-norm with MoE")
    if cfg.bias and (cfg.qk_norm or post or moe):
        problems.append("model.bias with QK-norm, post-norm or MoE (those families have unbiased MLPs)")
    if cfg.qkv_bias and not cfg.bias and (cfg.qk_norm or post or moe or not gated):
        problems.append("model.qkv_bias with QK-norm, post-norm, MoE or an ungated MLP (Qwen2 is none of those)")
    if moe and cfg.moe_groups > 1 and cfg.n_experts // cfg.moe_groups < 2:
        problems.append("MoE groups of one expert (GLM-4-MoE scores groups by their two best experts)")
    if problems:
        raise UserError("cannot export faithfully, no native equivalent for: " + "; ".join(problems))
    notes = []
    if cfg.mtp_heads:
        notes.append(f"dropped {cfg.mtp_heads} MTP head(s): transformers/llama.cpp run the trunk only")
    if cfg.doc_mask:
        notes.append("trained with document masking: exported runtimes let a prompt attend across <|endoftext|>")
    if cfg.mlp == "smooth_swiglu":
        notes.append("Smooth-SwiGLU exported as SwiGLU (identical at inference up to rounding)")
    if moe:
        return ExportPlan("glm4_moe", notes)
    if post:
        return ExportPlan("exaone4", notes)
    if cfg.qk_norm:
        return ExportPlan("qwen3", notes)
    if cfg.qkv_bias and not cfg.bias:
        return ExportPlan("qwen2", notes)
    return ExportPlan("llama" if gated else "arcee", notes)


def training_notes(checkpoint: str | Path) -> list[str]:
    """What the exports cannot carry about how a checkpoint was *trained* (read from train_state.pt).

    TCFP-12 / FP8 runs keep full-precision master weights and round them inside each matmul;
    the exports hold those master weights, exactly what codefoundry's own inference runs.
    """
    state = Path(checkpoint) / "train_state.pt"
    if not state.is_file():
        return []
    try:  # mmap: the optimizer state in the same file is never read into memory
        run = torch.load(state, map_location="cpu", mmap=True, weights_only=False).get("run") or {}
    except Exception:  # torch raises many types for truncated/corrupt pickles; the note is optional
        return []
    precision = (run.get("train") or {}).get("linear_precision", "default")
    if precision == "default":
        return []
    return [f"trained with {precision} matmuls, which no runtime here emulates: exported as the "
            "full-precision master weights (as codefoundry's own inference runs them)"]


def hf_name(name: str, model_type: str = "llama") -> str:
    """The transformers name of one of our parameters (``lm_head.weight`` is the same in both)."""
    post = model_type == "exaone4"  # our norms sit after the sublayer: EXAONE 4's post-norms
    renames = [
        (r"^embed\.", "model.embed_tokens."),
        (r"^blocks\.(\d+)\.attn_norm\.",
         r"model.layers.\1.post_attention_layernorm." if post else r"model.layers.\1.input_layernorm."),
        (r"^blocks\.(\d+)\.mlp_norm\.",
         r"model.layers.\1.post_feedforward_layernorm." if post else r"model.layers.\1.post_attention_layernorm."),
        (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
        (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
        (r"^norm\.", "model.norm."),
    ]
    for pattern, repl in renames:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def _norm_gains(model: Transformer) -> dict[str, torch.Tensor]:
    """Gains of one for RMSNorms built without them (``norm_learnable=False``)."""
    cfg = model.cfg
    return {f"{name}.weight": torch.ones(cfg.head_dim if name.endswith(("q_norm", "k_norm")) else cfg.dim)
            for name, m in model.named_modules()
            if isinstance(m, RMSNorm) and m.weight is None and not name.startswith("mtp.")}


def _fuse_experts(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our per-expert MLPs in GLM-4-MoE's layout: stacked routed experts, one wide shared expert.

    Shared experts all see every token, so their sum is one SwiGLU whose hidden units are the
    concatenation of theirs. Keys stay in our namespace (``blocks.N.mlp...``) for :func:`hf_name`.
    """
    out = {k: v for k, v in state.items() if ".mlp." not in k}
    for i in range(cfg.n_layers):
        p = f"blocks.{i}.mlp."
        out[p + "gate.weight"] = state[p + "router.weight"]
        out[p + "gate.e_score_correction_bias"] = state[p + "expert_bias"].float()
        experts = range(cfg.n_experts)
        out[p + "experts.gate_up_proj"] = torch.stack([
            torch.cat([state[f"{p}experts.{e}.gate_proj.weight"], state[f"{p}experts.{e}.up_proj.weight"]])
            for e in experts])
        out[p + "experts.down_proj"] = torch.stack([state[f"{p}experts.{e}.down_proj.weight"] for e in experts])
        shared = range(cfg.moe_shared_experts)
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            out[f"{p}shared_experts.{proj}.weight"] = torch.cat(
                [state[f"{p}shared_experts.{s}.{proj}.weight"] for s in shared], dim=dim)
    return out


def hf_state_dict(model: Transformer, model_type: str) -> dict[str, torch.Tensor]:
    """Our weights under transformers names (tied head included; HF re-ties it on load)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    state.update(_norm_gains(model))
    if model_type == "glm4_moe":
        state = _fuse_experts(state, model.cfg)
    return {hf_name(k, model_type): v for k, v in state.items()}


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers ``rope_parameters`` reproducing our cos/sin tables."""
    if not rope_active(cfg):
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "ntk":
        return {"rope_type": "default", "rope_theta": ntk_theta(cfg)}
    if cfg.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": cfg.rope_factor, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        return {"rope_type": "llama3", "factor": cfg.rope_factor, "rope_theta": cfg.rope_theta,
                "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_len}
    inv_freq, mscale = rope_frequencies(cfg)
    factors = (default_inv_freq(cfg) / inv_freq.double()).tolist()
    # Same factors for short and long contexts: the tables never switch with sequence length.
    return {"rope_type": "longrope", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "short_factor": factors, "long_factor": factors, "attention_factor": mscale,
            "original_max_position_embeddings": cfg.rope_original_max_len}


def hf_config(cfg: ModelConfig, tokenizer: CodeTokenizer, dtype: str = "fp32"):
    """A transformers config for our model (architecture from :func:`plan_export`)."""
    from transformers import AutoConfig

    model_type = plan_export(cfg).model_type
    class_name, activations = ARCHITECTURES[model_type]
    rope = rope_parameters(cfg)
    kwargs: dict[str, Any] = dict(
        architectures=[class_name], vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act=activations[cfg.mlp],
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope, attention_bias=cfg.bias, bos_token_id=token_id_of(tokenizer, tokenizer.config.bos_token),
        eos_token_id=sorted(tokenizer.chat_stop_ids), pad_token_id=pad_id(tokenizer),
        dtype=str(DTYPES[dtype]).removeprefix("torch."),
    )
    if model_type in ("llama", "arcee"):
        kwargs["mlp_bias"] = cfg.bias
    if model_type == "qwen2":
        kwargs.pop("attention_bias")  # Qwen2's q/k/v always carry biases
        kwargs.update(use_sliding_window=False, sliding_window=None)
    if model_type == "exaone4":
        kwargs.update(sliding_window=None, layer_types=["full_attention"] * cfg.n_layers)
    if model_type == "glm4_moe":
        rope["partial_rotary_factor"] = 1.0  # GLM's default rotates half of each head
        kwargs.update(
            moe_intermediate_size=cfg.ffn_dim, n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.moe_top_k,
            n_shared_experts=cfg.moe_shared_experts, n_group=cfg.moe_groups, topk_group=cfg.moe_group_top_k,
            first_k_dense_replace=0, norm_topk_prob=True, routed_scaling_factor=1.0, use_qk_norm=cfg.qk_norm,
            num_nextn_predict_layers=0,
        )
    return AutoConfig.for_model(model_type, **kwargs)


def build_hf_model(model: Transformer, tokenizer: CodeTokenizer, dtype: str = "fp32"):
    """An in-memory transformers model holding our weights (loaded strictly: no name may be missed)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model.cfg, tokenizer, dtype)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = hf_state_dict(model, config.model_type)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"internal export mapping error: transformers expects {missing[:3]}, "
                        f"got extra {unexpected[:3]}")
    if model.cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.to(DTYPES[dtype]).eval()


def token_id_of(tokenizer: CodeTokenizer, token: str | None) -> int:
    """The id of a config token string, the separator when there is none."""
    i = tokenizer.tk.token_to_id(token) if token else None
    return tokenizer.eot_id if i is None else i


def pad_id(tokenizer: CodeTokenizer) -> int:
    """Padding: the FIM pad token where there is one (never predicted in ordinary text), else the separator."""
    return tokenizer.special_ids[sp.FIM_PAD] if sp.FIM_PAD in tokenizer.special_ids else tokenizer.eot_id


def chat_template(tokenizer: CodeTokenizer) -> str:
    """The template ``codefoundry chat`` renders with: the model's own, or ours."""
    return tokenizer.config.chat_template or CHAT_TEMPLATE


def hf_tokenizer(tokenizer: CodeTokenizer, tokenizer_json: str | Path, max_len: int):
    """The checkpoint's tokenizer as a ``PreTrainedTokenizerFast`` with its special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    cfg = tokenizer.config
    eot = tokenizer.tk.id_to_token(tokenizer.eot_id)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), bos_token=cfg.bos_token or eot, eos_token=cfg.eos_token or eot,
        pad_token=tokenizer.tk.id_to_token(pad_id(tokenizer)), model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = chat_template(tokenizer)
    return hf_tok


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "fp32") -> ExportPlan:
    """Write a directory ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load unchanged."""
    from codefoundry.checkpoint import load_model

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)} for the hf format")
    model, tokenizer = load_model(checkpoint, "cpu")
    plan = plan_export(model.cfg)  # refuse before doing any work
    plan.notes += training_notes(checkpoint)
    hf_model = build_hf_model(model, tokenizer, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    hf_tokenizer(tokenizer, Path(checkpoint) / "tokenizer.json", model.cfg.max_seq_len).save_pretrained(out)
    (out / "codefoundry.json").write_text(json.dumps(
        {"source_checkpoint": str(Path(checkpoint).resolve()), "model": dataclasses.asdict(model.cfg),
         "notes": plan.notes}, indent=2) + "\n")
    return plan
