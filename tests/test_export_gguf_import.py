"""`codefoundry import --from gguf`: a quantized GGUF the test writes itself imports as exactly its dequantized
weights (logits equal to transformers' own GGUF loader), with the GGUF's tokenizer and chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export_common import assert_logits_close, code_ids, random_model, tiny_config

from codefoundry.checkpoint import load_model
from codefoundry.cli import main
from codefoundry.errors import UserError
from codefoundry.export.gguf_export import add_hparams, add_tokenizer, gguf_tensors
from codefoundry.export.gguf_import import import_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType
# Matrices cycle through these; K-quants are written as random blocks with sane scales (gguf-py only
# dequantizes them), the others with gguf's own quantizer.
TYPES = [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_K]
# Byte offsets of each block's f16 super-scales, and a range for them giving weights of ~0.02-0.1.
SCALES = {Q.Q4_K: ((0, 2), 1e-4), Q.Q5_K: ((0, 2), 5e-5), Q.Q6_K: ((208,), 1e-5)}


def encode(data: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    if qtype not in SCALES and qtype != Q.Q8_K:  # Q8_K: random bytes (never dequantized: the import refuses it)
        return gguf.quants.quantize(data, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (data.shape[0], data.shape[1] // block, size), dtype=np.uint8)
    offsets, scale = SCALES.get(qtype, ((), 0.0))
    for off in offsets:
        halves = rng.uniform(scale / 2, scale, raw.shape[:2]).astype(np.float16)
        raw[..., off:off + 2] = halves[..., None].view(np.uint8)
    return raw.reshape(data.shape[0], -1)


def write_gguf(path, model, tok, types, arch: str = "llama"):
    """A GGUF with matrices in ``types`` (cycled), 1-D tensors in F32, plus our hparams and tokenizer."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch)
    add_hparams(writer, model)
    add_tokenizer(writer, tok, model.cfg.vocab_size)
    for i, (name, tensor) in enumerate(gguf_tensors(model, arch).items()):
        data = tensor.numpy()
        if data.ndim == 1:
            writer.add_tensor(name, data)
        else:
            qtype = types[i % len(types)]
            writer.add_tensor(name, encode(data, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# qwen3: transformers' GGUF loader ignores attention.key_length and assumes Qwen3's head size of 128.
@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("qwen2", {"qkv_bias": True}),
                                             ("qwen3", {"qk_norm": True, "n_heads": 2, "n_kv_heads": 1})])
def test_quantized_gguf_imports_as_its_dequantized_weights(tiny_tokenizer, tmp_path, arch, overrides):
    tok, _ = tiny_tokenizer
    model = random_model(tiny_config(tok.vocab_size, dim=256, ffn_dim=512, **overrides))
    write_gguf(tmp_path / "m.gguf", model, tok, TYPES, arch)
    assert main(["import", "--from", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "ckpt")]) == 0
    ours, our_tok = load_model(tmp_path / "ckpt")
    assert our_tok.encode("def f(x):\n    return x") == tok.encode("def f(x):\n    return x")
    assert our_tok.special_ids == tok.special_ids and our_tok.config.chat_template is None  # ours, recognised
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embd.tensor_type == Q.Q4_K
    assert torch.equal(ours.embed.weight, torch.from_numpy(gguf.quants.dequantize(embd.data, embd.tensor_type)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = code_ids(tok)
    with torch.no_grad():
        assert_logits_close(ours(ids), hf(ids).logits)
        assert float((ours(ids) - model(ids)).abs().max()) > 1e-3  # the quantization really happened


def test_llama31_rope_freqs_come_back_as_llama3_scaling(tiny_tokenizer, tmp_path):
    """llama.cpp keeps Llama 3.1's scaling only as per-dimension divisors; the import recovers exact tables."""
    tok, _ = tiny_tokenizer
    model = random_model(tiny_config(tok.vocab_size, head_dim=64, n_heads=2, n_kv_heads=1, rope_theta=5e5,
                                     rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64))
    write_gguf(tmp_path / "m.gguf", model, tok, [Q.F32])
    ours, _ = load_model(import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")["out"])
    assert ours.cfg.rope_scaling == "llama3" and ours.cfg.rope_factor == 8.0
    torch.testing.assert_close(ours.rope_cos, model.rope_cos, rtol=0, atol=1e-5)  # float32 rounding of the fit
    ids = code_ids(tok)
    with torch.no_grad():
        assert_logits_close(ours(ids), model(ids), tol=1e-5)


def test_gguf_we_cannot_reproduce_is_refused_and_nothing_written(tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    model = random_model(tiny_config(tok.vocab_size, dim=256, ffn_dim=512))
    write_gguf(tmp_path / "q8k.gguf", model, tok, [Q.Q8_0, Q.Q8_K])
    with pytest.raises(UserError, match=r"GGUF tensor \S+ has type Q8_K, which the gguf package cannot dequantize"):
        import_gguf(tmp_path / "q8k.gguf", tmp_path / "ckpt")
    yarn = random_model(tiny_config(tok.vocab_size, rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=32))
    write_gguf(tmp_path / "yarn.gguf", yarn, tok, [Q.F32])
    with pytest.raises(UserError, match=r"RoPE frequencies \(rope_freqs\) follow no llama3 scaling"):
        import_gguf(tmp_path / "yarn.gguf", tmp_path / "ckpt")
    with pytest.raises(UserError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
