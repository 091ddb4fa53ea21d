"""Dataclass configs: every setting, its default (written once, here) and its validation.

A run is described by one :class:`RunConfig` (model + train sections). Each dataclass checks
its choices on construction, so a typo fails at once with one line, before any model is
built. Resolving a run from a preset, a YAML recipe and ``section.field=value`` overrides is
:mod:`codefoundry.recipes`; the named presets are :mod:`codefoundry.presets`. This module
imports neither (nor torch), so everything can depend on it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from codefoundry.errors import UserError


class ConfigError(UserError):
    """A config key or value the user must fix; printed as one line by the CLI."""


@dataclass
class ModelConfig:
    """Decoder-only transformer hyper-parameters. Every architectural switch lives here.

    Defaults give the plain baseline (pre-norm, SwiGLU, dense, no extra losses), so an
    older saved config without the newer keys loads to the same model it was trained as.
    """

    # field -> the fields it is derived from when left at 0; re-derived when they change (see update_dataclass)
    DERIVED = {"head_dim": ("dim", "n_heads"), "ffn_dim": ("dim", "mlp"), "rope_original_max_len": ("max_seq_len",)}

    vocab_size: int = 8192
    vocab_multiple: int = 1  # embedding rows padded up to a multiple of this (64/256 suit GPU GEMMs)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # GQA: n_heads % n_kv_heads == 0; 1 = MQA, n_heads = MHA
    head_dim: int = 0  # 0 -> dim // n_heads
    ffn_dim: int = 0  # 0 -> SwiGLU-style 8/3 * dim rounded to 64 (4 * dim for 1-matrix MLPs); MoE: per expert
    mlp: str = "swiglu"  # swiglu | smooth_swiglu | relu2 | gelu
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre: x + f(norm(x)) | post: x + norm(f(x)) (sublayer output normalised)
    norm_learnable: bool = True  # False: RMSNorms have no gain parameters at all
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | linear | ntk | yarn | llama3
    rope_factor: float = 1.0  # context extension factor for rope_scaling
    rope_low_freq_factor: float = 1.0  # llama3 (Llama 3.1): wavelengths above original/low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept; smooth in between
    rope_original_max_len: int = 0  # training context the scaling extends (0 -> max_seq_len)
    qk_norm: bool = False
    qk_norm_frozen: bool = False  # QK-norm gains kept at 1 and never trained (FP8-stable recipe)
    attn_sinks: bool = False  # a learned per-head logit in every softmax denominator
    diff_attn: bool = False  # differential attention: pairs of heads, softmax(Q1K1) - lambda * softmax(Q2K2)
    doc_mask: bool = False  # packed rows: no attention across documents (each starts with doc_sep_id)
    doc_sep_id: int = 0  # the token that opens every document (EOT)
    tie_embeddings: bool = True
    bias: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2-style; `bias` puts them everywhere)
    dropout: float = 0.0
    logit_softcap: float = 0.0  # 0 = off; else logits = c * tanh(logits / c)
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) added to the training loss
    init_std: float = 0.02
    depth_scaled_init: bool = True  # residual-output projections get std / sqrt(2 * n_layers)
    loss_chunk: int = 0  # cross-entropy rows per chunk: >0 this many, <0 never chunked, 0 auto (chunked at vocab >= 32k)
    n_experts: int = 0  # 0 = dense MLP; >0 = routed SwiGLU experts of width ffn_dim in every layer
    moe_shared_experts: int = 1  # always-on experts added to the routed output
    moe_top_k: int = 2  # routed experts per token
    moe_groups: int = 1  # experts split into this many groups ...
    moe_group_top_k: int = 1  # ... of which this many are chosen first (group-limited routing)
    moe_bias_rate: float = 1e-3  # aux-loss-free balancing: per-step bias nudge (0 = off)
    moe_aux_loss: float = 0.0  # optional Switch-style load-balancing loss coefficient (0 = off)
    mtp_heads: int = 0  # extra heads predicting tokens t+2, t+3, ... (multi-token prediction)
    mtp_loss_weight: float = 0.3  # weight of the mean MTP cross-entropy in the training loss

    def __post_init__(self) -> None:
        if self.vocab_multiple < 1:
            raise ConfigError(f"model.vocab_multiple={self.vocab_multiple} must be at least 1")
        self.vocab_size = -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        _check_choice("model.mlp", self.mlp, ("swiglu", "smooth_swiglu", "relu2", "gelu"))
        _check_choice("model.norm_placement", self.norm_placement, ("pre", "post"))
        _check_choice("model.rope_scaling", self.rope_scaling, ("none", "linear", "ntk", "yarn", "llama3"))
        if self.ffn_dim == 0:
            if self.mlp in ("swiglu", "smooth_swiglu"):
                self.ffn_dim = 64 * round(8 * self.dim / 3 / 64) or 64
            else:
                self.ffn_dim = 4 * self.dim
        if self.rope_original_max_len == 0:
            self.rope_original_max_len = self.max_seq_len
        if self.diff_attn and (self.n_heads % 2 or self.n_kv_heads % 2):
            raise ConfigError("model.diff_attn pairs heads: model.n_heads and model.n_kv_heads must both be even")
        if self.diff_attn and self.attn_sinks:
            raise ConfigError("model.diff_attn and model.attn_sinks cannot be combined; enable one of them")
        if self.n_experts:
            if self.n_experts % self.moe_groups or not 0 < self.moe_group_top_k <= self.moe_groups:
                raise ConfigError(f"model.n_experts={self.n_experts} must split evenly into model.moe_groups="
                                  f"{self.moe_groups}, and 0 < model.moe_group_top_k <= model.moe_groups")
            selectable = self.n_experts // self.moe_groups * self.moe_group_top_k
            if not 0 < self.moe_top_k <= selectable:
                raise ConfigError(f"model.moe_top_k={self.moe_top_k} must be between 1 and the {selectable} "
                                  "experts the chosen groups hold")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: use one of {', '.join(choices)}")


@dataclass
class TrainConfig:
    """Pretraining loop settings. ``max_steps=0`` with ``minutes>0`` sizes the run to a time budget."""

    data: str = ""  # directory written by `data prepare` (holds train/ and val/)
    out: str = "runs/default"
    seq_len: int = 512
    batch_size: int = 16  # rows per micro-batch (per rank)
    grad_accum: int = 1
    max_steps: int = 0
    minutes: float = 0.0
    epochs: float = 0.0  # >0: passes over the training data (sizes max_steps; the epoch is kept in the loader state)
    optimizer: str = "adamw"  # adamw | muon
    lr: float = 3e-3
    embed_lr_ratio: float = 1.0  # embedding lr = lr * ratio
    muon_lr: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.3  # WSD: final fraction of steps spent decaying
    min_lr_ratio: float = 0.0
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0 = only at the end
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: str = "auto"  # auto (on for CUDA) | on | off
    threads: int = 0  # CPU intra-op threads; 0 = all cores
    # Sequence-length curriculum: "SEQ:UNTIL_STEP,..." e.g. "128:200,256:500" trains rows of 128
    # tokens until step 200, 256 until step 500, then seq_len; rows per step grow so tokens per
    # step stay constant (each stage's seq must divide seq_len). "" = off.
    curriculum: str = ""
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    linear_precision: str = "default"  # default | fp8-tensorwise | fp8-rowwise (torchao, GPU) | tcfp12
    parallel: str = "ddp"  # ddp | fsdp (used when launched by torchrun with WORLD_SIZE > 1)
    keep_last: int = 2  # checkpoints kept under out/checkpoints/ (plus the best by validation loss)
    keep_best: bool = True  # keep the checkpoint with the lowest val_loss (out/checkpoint-best)
    nan_guard: bool = True  # skip steps whose loss/grad is non-finite or spikes (one scalar read per step)
    spike_factor: float = 4.0  # guard: skip a step whose loss exceeds this x its running mean (0 = off)
    max_skips: int = 10  # guard: abort after this many consecutive skipped steps
    tensorboard: bool = False  # also log to out/tensorboard (needs the `logging` extra)
    wandb_project: str = ""  # also log to this W&B project (needs the `logging` extra)
    # Code benchmarks during training: greedy pass@1 on the first eval_limit tasks, programs run in the sandbox.
    humaneval_every: int = 0  # every N steps (and at the end); 0 = off
    mbpp_every: int = 0
    eval_limit: int = 20
    eval_max_new_tokens: int = 256
    eval_data: str = ""  # a directory holding HumanEval.jsonl.gz / mbpp.jsonl, or the one file; "" = packaged/cached copy
    keep_best_metric: str = "val_loss"  # what checkpoint-best is best by: val_loss | humaneval_pass@1 | mbpp_pass@1

    CHOICES = {"optimizer": ("adamw", "muon"), "schedule": ("wsd", "cosine", "constant"),
               "dtype": ("auto", "fp32", "bf16", "fp16"), "compile": ("auto", "on", "off"),
               "linear_precision": ("default", "fp8-tensorwise", "fp8-rowwise", "tcfp12"),
               "parallel": ("ddp", "fsdp"), "keep_best_metric": ("val_loss", "humaneval_pass@1", "mbpp_pass@1")}

    def __post_init__(self) -> None:
        for name, choices in self.CHOICES.items():
            _check_choice(f"train.{name}", getattr(self, name), choices)
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            raise ConfigError(f"train.device={self.device!r}: use auto, cpu, cuda or cuda:N")
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be at least 1")
        if self.max_steps < 0 or self.minutes < 0 or self.epochs < 0:
            raise ConfigError("train.max_steps, train.minutes and train.epochs must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction={self.decay_fraction} must be between 0 and 1")
        parse_curriculum(self.curriculum, self.seq_len)
        if min(self.humaneval_every, self.mbpp_every) < 0 or self.eval_limit < 1 or self.eval_max_new_tokens < 1:
            raise ConfigError("train.humaneval_every and train.mbpp_every must be >= 0, train.eval_limit and "
                              "train.eval_max_new_tokens >= 1")
        bench = self.keep_best_metric.removesuffix("_pass@1")
        if bench != "val_loss" and not getattr(self, f"{bench}_every"):
            raise ConfigError(f"train.keep_best_metric={self.keep_best_metric} needs train.{bench}_every > 0")


def parse_curriculum(spec: str, seq_len: int) -> list[tuple[int, int]]:
    """``"128:200,256:500"`` -> [(128, 200), (256, 500)]: row length and the step it lasts until.

    Lengths must divide ``seq_len`` (rows are cut from full-length rows, see PackedLoader) and
    stages must be in increasing step order.
    """
    stages: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            length, until = (int(v) for v in part.split(":"))
        except ValueError:
            raise ConfigError(f"train.curriculum={spec!r}: write SEQ:UNTIL_STEP pairs, e.g. 128:200,256:500") from None
        if length <= 0 or seq_len % length:
            raise ConfigError(f"train.curriculum: row length {length} must divide train.seq_len={seq_len}")
        if stages and until <= stages[-1][1]:
            raise ConfigError(f"train.curriculum={spec!r}: stage steps must increase")
        stages.append((length, until))
    return stages


@dataclass
class DataConfig:
    """How a recipe's training data is made: where it comes from and what the data stage keeps.

    ``codefoundry speedrun`` reads it to download, tokenize and prepare; ``stream=true`` trains
    straight from ``sources`` (:mod:`codefoundry.data.stream`) with the same filters and FIM.
    Near-duplicate removal needs the whole corpus, so only a prepare run (not a stream) applies ``dedup``.
    """

    sources: list[str] = field(default_factory=list)  # folders, files, fsspec URLs, hf:NAME or hub corpora
    languages: list[str] = field(default_factory=list)  # [] = every language the readers recognise
    vocab_size: int = 0  # tokenizer to train (BPE + FIM/chat/tool specials); 0 = the preset's vocabulary
    fim_rate: float = 0.5
    quality_threshold: float = 0.5
    dedup: bool = True  # exact + MinHash near-duplicate removal
    decontaminate: bool = True  # drop files containing HumanEval / MBPP text
    val_fraction: float = 0.04
    val_by: str = ""  # "", "language" or "source": one extra held-out shard per domain
    max_gb: float = 0.0  # download at most this many GB of a hub corpus (0 = all of it)
    stream: bool = False  # train from `sources` through data.stream_workers loader processes
    stream_workers: int = 4

    def __post_init__(self) -> None:
        for name in ("sources", "languages"):
            value = getattr(self, name)
            if isinstance(value, str):  # `data.languages=python,go` on the command line
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"data.{name}={value!r}: give a list of strings, e.g. [python, go]")
            setattr(self, name, value)
        if not 0 <= self.fim_rate <= 1 or not 0 <= self.quality_threshold <= 1 or not 0 <= self.val_fraction < 1:
            raise ConfigError("data.fim_rate and data.quality_threshold must be in [0, 1], data.val_fraction in [0, 1)")
        _check_choice("data.val_by", self.val_by, ("", "language", "source"))
        if self.vocab_size < 0 or self.max_gb < 0 or self.stream_workers < 0:
            raise ConfigError("data.vocab_size, data.max_gb and data.stream_workers must be >= 0")


@dataclass
class RunConfig:
    preset: str = "speedrun-cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _coerce(value: Any, target_type: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field's declared type."""
    type_name = target_type if isinstance(target_type, str) else getattr(target_type, "__name__", str(target_type))
    try:
        if type_name == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "str":
            if isinstance(value, (bool, list, dict)) or value is None:
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {type_name}") from None
    return value


def update_dataclass(obj: Any, values: dict[str, Any], prefix: str) -> Any:
    """Return a copy of ``obj`` with ``values`` applied; unknown keys are an error, never ignored.

    Fields derived in ``__post_init__`` (``DERIVED``: field -> the fields it depends on) are
    re-derived when one of their inputs changes, unless they are set explicitly or held a
    value of their own (e.g. YaRN's ``rope_original_max_len`` stays when ``max_seq_len`` grows).
    """
    known = {f.name: f for f in fields(obj)}
    old = {name: getattr(obj, name) for name in known}
    merged = dict(old)
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(known))})")
        merged[key] = _coerce(value, known[key].type, prefix + key)
    for derived, inputs in getattr(type(obj), "DERIVED", {}).items():
        if derived not in values and any(k in values for k in inputs):
            try:
                was_derived = getattr(type(obj)(**{**old, derived: 0}), derived) == old[derived]
            except ConfigError:
                was_derived = False
            if was_derived:
                merged[derived] = 0
    return type(obj)(**merged)


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Load a saved model config; unknown keys (e.g. from a newer version) are an error."""
    return update_dataclass(ModelConfig(), values, "model.")
