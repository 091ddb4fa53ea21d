"""GGUF export: metadata and tensors read back with gguf's reader, and a forward pass run from
the file with llama.cpp's semantics (its RoPE modes, rope_freqs, tied output) gives our logits."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_export_common import assert_logits_close, code_ids, make_checkpoint

from codefoundry.cli import main
from codefoundry.errors import UserError
from codefoundry.export.gguf_export import LLAMA3_SPLIT_PATTERN, check_llama_bpe, export_gguf
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer import special as sp

gguf = pytest.importorskip("gguf")


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def gguf_weights(reader) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            for t in reader.tensors}


def llamacpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) for ids (1, T) computed from the GGUF alone, the way llama.cpp's graphs do."""
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")

    def hp(key, default=None):
        value = field(r, f"{arch}.{key}")
        return default if value is None else value

    w = gguf_weights(r)
    n_head, n_kv, d = hp("attention.head_count"), hp("attention.head_count_kv"), hp("rope.dimension_count")
    eps = hp("attention.layer_norm_rms_epsilon")
    factors = w.get("rope_freqs.weight", torch.ones(d // 2))
    theta = hp("rope.freq_base") ** (-torch.arange(0, d, 2).double() / d) / hp("rope.scaling.factor", 1.0) / factors
    angles = torch.arange(ids.shape[1]).double()[:, None] * theta
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]  # (T, 1, d/2)

    def rope(x):  # (T, H, d)
        if arch in ("llama", "arcee"):  # LLAMA_ROPE_TYPE_NORM: rotate pairs (2i, 2i+1)
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        a, b = x[..., :d // 2], x[..., d // 2:]  # NEOX: pairs (i, i + d/2)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    def norm(x, name):
        return F.rms_norm(x, (x.shape[-1],), w[name], eps)

    def lin(x, name):
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    t = ids.shape[1]
    x = w["token_embd.weight"][ids[0]]
    for i in range(hp("block_count")):
        p = f"blk.{i}."
        h = norm(x, p + "attn_norm.weight")
        q, k, v = (lin(h, p + n).view(t, -1, d) for n in ("attn_q", "attn_k", "attn_v"))
        if p + "attn_q_norm.weight" in w:
            q, k = norm(q, p + "attn_q_norm.weight"), norm(k, p + "attn_k_norm.weight")
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(n_head // n_kv, 1), v.repeat_interleave(n_head // n_kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        x = x + lin(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, -1), p + "attn_output")
        h = norm(x, p + "ffn_norm.weight")
        if arch == "arcee":
            h = F.relu(lin(h, p + "ffn_up")).square()
        else:
            h = F.silu(lin(h, p + "ffn_gate")) * lin(h, p + "ffn_up")
        x = x + lin(h, p + "ffn_down")
    out = w.get("output.weight", w["token_embd.weight"])
    return norm(x, "output_norm.weight") @ out.T


CASES = {
    "llama": {},
    "llama-yarn": {"rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_len": 64},
    "qwen3-ntk": {"qk_norm": True, "rope_scaling": "ntk", "rope_factor": 2.0},
    "arcee-linear-untied": {"mlp": "relu2", "rope_scaling": "linear", "rope_factor": 2.0, "tie_embeddings": False},
    "llama-bias": {"bias": True},
    "llama-no-gains-mtp": {"norm_learnable": False, "mtp_heads": 1},
}


@pytest.mark.parametrize("name", list(CASES))
def test_llamacpp_forward_from_the_file_gives_our_logits(tiny_tokenizer, tmp_path, name):
    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path, **CASES[name])
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    ids = code_ids(tok)
    with torch.no_grad():
        assert_logits_close(model(ids)[0], llamacpp_logits(tmp_path / "m.gguf", ids))


def test_interleaved_rope_would_break_without_the_qk_permutation(tiny_tokenizer, tmp_path, monkeypatch):
    """The reference is sensitive to the layout: skipping the permutation changes the logits."""
    import codefoundry.export.gguf_export as ge

    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path)
    monkeypatch.setattr(ge, "permute_for_interleaved_rope", lambda w, n: w)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    ids = code_ids(tok)
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_logits_close(model(ids)[0], llamacpp_logits(tmp_path / "m.gguf", ids))


def test_metadata_tokenizer_and_chat_template_read_back(tiny_tokenizer, tmp_path):
    tok, tok_path = tiny_tokenizer
    make_checkpoint(tmp_path / "ckpt", tok_path)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "gguf",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.context_length") == 256 and field(r, "llama.block_count") == 2
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "llama-bpe"
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens == [tok.tk.id_to_token(i) for i in range(tok.vocab_size)]
    types = field(r, "tokenizer.ggml.token_type")
    control = int(gguf.TokenType.CONTROL)
    assert {i for i, t in enumerate(types) if t == control} == set(tok.special_ids.values())
    merges = json.loads(tok.tk.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    ids = tok.special_ids
    assert field(r, "tokenizer.ggml.bos_token_id") == tok.eot_id == field(r, "tokenizer.ggml.eos_token_id")
    assert field(r, "tokenizer.ggml.eot_token_id") == ids[sp.ASSISTANT_END]
    assert field(r, "tokenizer.ggml.fim_pre_token_id") == ids[sp.FIM_PREFIX]
    assert field(r, "tokenizer.ggml.fim_suf_token_id") == ids[sp.FIM_SUFFIX]
    assert field(r, "tokenizer.ggml.fim_mid_token_id") == ids[sp.FIM_MIDDLE]
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert sp.ASSISTANT_START in field(r, "tokenizer.chat_template")
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied: llama.cpp reuses token_embd


@pytest.mark.parametrize("dtype, kind, tol, logit_tol", [
    ("bf16", "BF16", 2e-2, 5e-2), ("q8_0", "Q8_0", 3e-2, 5e-2), ("q4_1", "Q4_1", 0.1, 0.2), ("q4_0", "Q4_0", 0.15, 0.3),
])
def test_low_precision_tensors_dequantize_close_to_ours(tiny_tokenizer, tmp_path, dtype, kind, tol, logit_tol):
    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", dtype)
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.1.ffn_down.weight"] == kind and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["token_embd.weight"] == ("Q8_0" if kind.startswith("Q4") else kind)  # 4-bit files keep it 8-bit
    w = gguf_weights(r)
    ours = model.blocks[1].mlp.down_proj.weight
    err = (w["blk.1.ffn_down.weight"] - ours).abs().max()
    assert 0 < err <= tol * ours.abs().max()
    ids = code_ids(tok)
    with torch.no_grad():
        assert_logits_close(model(ids)[0], llamacpp_logits(tmp_path / "m.gguf", ids), tol=logit_tol)


@pytest.mark.parametrize("overrides, words", [
    ({"mlp": "gelu"}, "ReLU² only"),
    ({"mlp": "relu2", "bias": True}, "no output-projection or MLP biases"),  # found by running the file in llama.cpp
    ({"qk_norm": True, "rope_scaling": "yarn", "rope_factor": 2.0}, "yarn rope scaling"),
    ({"qk_norm": True, "rope_scaling": "llama3", "rope_factor": 2.0}, "llama3 rope scaling"),
    ({"n_experts": 4, "ffn_dim": 96}, "post-norm or MoE"),
])
def test_models_llamacpp_cannot_run_exactly_are_refused(tiny_tokenizer, tmp_path, overrides, words):
    _, tok_path = tiny_tokenizer
    make_checkpoint(tmp_path / "ckpt", tok_path, **overrides)
    with pytest.raises(UserError, match=words):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizer_is_llama3s_and_foreign_ones_are_refused(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    assert sp.SPLIT_PATTERN == LLAMA3_SPLIT_PATTERN
    check_llama_bpe(tok)  # every merge-built entry is reachable: llama.cpp's ignore_merges changes nothing
    spec = json.loads(tok.tk.to_str())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    from tokenizers import Tokenizer

    with pytest.raises(UserError, match="split regex"):
        check_llama_bpe(CodeTokenizer(Tokenizer.from_str(json.dumps(spec))))
