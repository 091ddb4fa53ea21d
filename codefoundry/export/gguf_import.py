"""Import a llama-family GGUF file (llama.cpp's format), quantized or not, as our checkpoint.

* **Weights.** Every tensor is dequantized with the ``gguf`` package's own ``dequantize`` (F32,
  F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x, the K-quants and the rest it implements), so the imported
  model is exactly the GGUF's dequantized weights in fp32. A type ``gguf`` cannot dequantize
  is refused, naming the tensor. Names come back through ``gguf``'s HF <-> GGUF name map (the
  one the GGUF export uses), and the ``llama`` graph's interleaved Q/K rows are permuted back
  to our rotate-half layout (the inverse of llama.cpp's converter); ``qwen2`` / ``qwen3`` use
  NeoX RoPE and need none.
* **Architectures.** ``llama`` (also what llama.cpp calls Mistral without a sliding window),
  ``qwen2`` (q/k/v biases), ``qwen3`` (q/k norm). Default or linear RoPE, or Llama 3.1's scaling,
  which llama.cpp stores as per-dimension divisors (``rope_freqs``) that are fitted back to our
  llama3 settings and checked to reproduce every frequency; other ``rope_freqs`` (e.g. YaRN),
  partial rotary or a sliding window are refused in one line.
* **Tokenizer.** transformers' GGUF tokenizer builder (the ``hf`` extra) turns the GGUF vocabulary,
  merges and pre-tokenizer into a ``tokenizer.json`` with the GGUF's chat template and BOS/EOS;
  roles are then adopted exactly as for ``import --from hf``. A GGUF that carries codefoundry's
  own template (one of our exports) gets our native renderer back.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codefoundry.config import ModelConfig
from codefoundry.errors import UserError
from codefoundry.export.chat_template import CHAT_TEMPLATE
from codefoundry.export.hf import hf_name
from codefoundry.export.hf_import import load_state_into, write_imported
from codefoundry.model import Transformer
from codefoundry.model.rope import default_inv_freq, rope_frequencies
from codefoundry.tokenizer.pretrained import Adopted, adopt, read_hf_tokenizer

GGUF_ARCHES = ("llama", "qwen2", "qwen3")
INTERLEAVED = ("llama",)  # llama.cpp graphs with normal (interleaved-pair) RoPE


def unpermute_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`codefoundry.export.gguf_export.permute_for_interleaved_rope`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def model_config_from_gguf(reader) -> tuple[str, ModelConfig]:
    """(architecture, our ModelConfig) from GGUF metadata; one-line UserError if it cannot be exact."""
    import gguf

    arch = field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch not in GGUF_ARCHES:
        raise UserError(f"cannot import GGUF architecture {arch!r}: supported are {', '.join(GGUF_ARCHES)}")

    def k(key: str, default: Any = None) -> Any:
        return field(reader, key.format(arch=arch), default)

    names = {t.name for t in reader.tensors}
    dim, n_heads = k(gguf.Keys.LLM.EMBEDDING_LENGTH), k(gguf.Keys.Attention.HEAD_COUNT)
    head_dim = k(gguf.Keys.Attention.KEY_LENGTH) or dim // n_heads
    problems = []
    scaling = k(gguf.Keys.Rope.SCALING_TYPE, "none")
    if scaling not in ("none", "linear"):
        problems.append(f"rope scaling {scaling!r} (none and linear import)")
    if k(gguf.Keys.Rope.DIMENSION_COUNT, head_dim) != head_dim:
        problems.append("partial rotary embeddings")
    if k(gguf.Keys.Attention.SLIDING_WINDOW):
        problems.append("sliding-window attention")
    if k(gguf.Keys.Attention.VALUE_LENGTH, head_dim) != head_dim:
        problems.append("value heads of another width than key heads")
    if problems:
        raise UserError(f"cannot import this {arch} GGUF exactly: " + "; ".join(problems))
    has_bias = "blk.0.attn_q.bias" in names
    rows = next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight")  # GGUF shapes are reversed
    cfg = ModelConfig(
        vocab_size=int(rows), dim=dim, n_layers=k(gguf.Keys.LLM.BLOCK_COUNT), n_heads=n_heads,
        n_kv_heads=k(gguf.Keys.Attention.HEAD_COUNT_KV, n_heads), head_dim=head_dim,
        ffn_dim=k(gguf.Keys.LLM.FEED_FORWARD_LENGTH), max_seq_len=k(gguf.Keys.LLM.CONTEXT_LENGTH),
        norm_eps=k(gguf.Keys.Attention.LAYERNORM_RMS_EPS), rope_theta=float(k(gguf.Keys.Rope.FREQ_BASE, 10000.0)),
        rope_scaling=scaling, rope_factor=float(k(gguf.Keys.Rope.SCALING_FACTOR, 1.0)),
        qk_norm=arch == "qwen3", tie_embeddings="output.weight" not in names,
        bias=has_bias and arch == "llama", qkv_bias=has_bias and arch == "qwen2",
    )
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return arch, cfg if freqs is None else llama3_from_rope_freqs(cfg, dequantized(freqs).double())


def llama3_from_rope_freqs(cfg: ModelConfig, divisors: torch.Tensor) -> ModelConfig:
    """Our llama3 rope settings reproducing a GGUF's per-dimension frequency divisors (how llama.cpp stores
    Llama 3.1's scaling), or a one-line UserError when they follow no llama3 scaling.

    llama3 divides dimension i by 1 / ((1 - s_i) / factor + s_i) with s_i = clamp(a / wavelength_i - b, 0, 1);
    the largest divisor is the factor, and (a, b) come from the blended band. Only a and b matter, so
    the original context is set to the GGUF's and the low/high factors follow from it.
    """
    factor = float(divisors.max())
    if factor <= 1:
        return cfg
    s = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    x = default_inv_freq(cfg) / (2 * math.pi)  # 1 / wavelength
    band = (s > 1e-6) & (s < 1 - 1e-6)
    fitted = None
    if int(band.sum()) >= 2:
        a, b = np.polyfit(x[band].numpy(), s[band].numpy(), 1)
        original = cfg.max_seq_len
        low = -b * original / a
        fitted = dataclasses.replace(cfg, rope_scaling="llama3", rope_factor=factor, rope_original_max_len=original,
                                     rope_low_freq_factor=low, rope_high_freq_factor=low + original / a)
    ok = fitted is not None and torch.allclose(rope_frequencies(fitted)[0].double(), default_inv_freq(cfg) / divisors,
                                               rtol=1e-5, atol=0)
    if not ok:
        raise UserError("cannot import this GGUF exactly: its per-dimension RoPE frequencies (rope_freqs) follow no "
                        "llama3 scaling; import its transformers checkpoint with --from hf instead")
    return fitted


def dequantized(tensor) -> torch.Tensor:
    """One GGUF tensor as fp32 in PyTorch's (rows, cols) order."""
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf package "
                        "cannot dequantize; requantize the file (e.g. Q8_0 or a K-quant)") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the reader's map is read-only


def gguf_state_dict(reader, arch: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The GGUF's weights under transformers names, dequantized and in our RoPE layout."""
    import gguf

    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.TensorNameMap(arch_enum, cfg.n_layers)
    by_name = {t.name: t for t in reader.tensors}
    state, used = {}, set()
    for ours in Transformer(cfg).state_dict():
        hf = hf_name(ours)
        if hf == "lm_head.weight" and cfg.tie_embeddings:
            continue
        gg = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gg not in by_name:
            raise UserError(f"GGUF file lacks tensor {gg} (for {hf}); it is not a complete {arch} model")
        w = dequantized(by_name[gg])
        if arch in INTERLEAVED and ".self_attn.q_proj." in hf:
            w = unpermute_interleaved(w, cfg.n_heads)
        elif arch in INTERLEAVED and ".self_attn.k_proj." in hf:
            w = unpermute_interleaved(w, cfg.n_kv_heads)
        state[hf] = w
        used.add(gg)
    extra = sorted(set(by_name) - used - {"rope_freqs.weight"})  # rope_freqs: read into the config
    if extra:
        raise UserError(f"GGUF tensors {extra[:3]} have no place in our {arch} model; cannot import it exactly")
    return state


def gguf_tokenizer(path: Path, append: bool) -> Adopted:
    """The GGUF's tokenizer, chat template and BOS/EOS, built by transformers, with our roles adopted."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("importing a GGUF tokenizer needs transformers: pip install 'codefoundry[hf]'") from None
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UserError(f"cannot rebuild the tokenizer of {path} ({str(exc).splitlines()[0]})") from None
    with tempfile.TemporaryDirectory() as tmp:
        hf_tok.save_pretrained(tmp)
        tk, config = read_hf_tokenizer(tmp)
    if config.chat_template == CHAT_TEMPLATE:  # one of our exports: render with our own code again
        config.chat_template = None
    return adopt(tk, config, append)


def import_gguf(path: str | Path, out: str | Path, append: bool = True) -> dict[str, Any]:
    """Write our checkpoint directory ``out`` from a GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not a readable GGUF file ({exc})") from None
    arch, cfg = model_config_from_gguf(reader)
    adopted = gguf_tokenizer(path, append)
    model = load_state_into(gguf_state_dict(reader, arch, cfg).items(), cfg, str(path))
    return write_imported(out, model, adopted, f"gguf-import:{arch}")
