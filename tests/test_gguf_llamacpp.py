"""Our GGUF export as llama.cpp itself reads it (the prebuilt library in llama-cpp-py-sync):
its tokenizer gives our ids, and greedy decoding gives our tokens from logits close to ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export_common import CODE, make_checkpoint
from test_export_gguf import llamacpp_logits

from codefoundry.export.gguf_export import export_gguf
from codefoundry.export.llamacpp import LlamaCpp, LlamaCppUnavailable, open_library
from codefoundry.infer.generate import generate_tokens

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp_py_sync", reason="llama.cpp comes with llama-cpp-py-sync (the dev extra)")
try:
    open_library()
except LlamaCppUnavailable as exc:  # installed, but its prebuilt library needs a newer glibc than this system's
    pytest.skip(str(exc), allow_module_level=True)

N_NEW = 24


def our_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits each was chosen from (N_NEW, V), by our own decoding loop."""
    logits = []
    tokens = list(generate_tokens(model, [prompt], N_NEW, sample=lambda x: (logits.append(x[0]), x.argmax(-1))[1]))
    return torch.cat(tokens).tolist(), torch.stack(logits)


def llamacpp_greedy(path, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    with LlamaCpp(path, threads=1) as llm:
        tokens, logits = [], [llm.eval(prompt)]
        for _ in range(N_NEW):
            tokens.append(int(logits[-1].argmax()))
            logits.append(llm.eval(tokens[-1:]))
        assert list(llm.greedy(prompt, N_NEW)) == tokens  # the bench's loop: same tokens from a reset context
    return tokens, np.stack(logits[:-1])


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"qkv_bias": True}, {"bias": True, "tie_embeddings": False},
                                       {"mlp": "relu2", "tie_embeddings": False}],
                         ids=["llama", "qwen3", "qwen2", "llama-bias-untied", "arcee-untied"])
def test_llamacpp_decodes_our_f32_export_as_we_do(tiny_tokenizer, tmp_path, overrides):
    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path, init_std=0.2, **overrides)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    prompt = tok.encode(CODE[:300])
    with LlamaCpp(tmp_path / "m.gguf", threads=1) as llm:
        assert llm.n_vocab == tok.vocab_size
    with torch.no_grad():
        ours, our_logits = our_greedy(model, prompt)
    theirs, their_logits = llamacpp_greedy(tmp_path / "m.gguf", prompt)
    assert theirs == ours
    # Ours agrees with a float64 forward to ~4e-7 of the logit scale; llama.cpp's F32 CPU path to ~4e-4 on
    # one token (growing to ~4e-3 over 160 positions of this peaked model). A mapping mistake is ~1.
    scale = float(our_logits.abs().max())
    err = float((our_logits - torch.from_numpy(their_logits)).abs().max())
    assert err <= 1e-2 * scale, f"max |logit diff| {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0", "q4_1"])
def test_llamacpp_reads_our_low_precision_tensors_as_written(tiny_tokenizer, tmp_path, dtype):
    """llama.cpp's logits match a forward pass over the file's own dequantized weights (gguf.quants); what
    is left is llama.cpp rounding activations to 8 bits for block-quantized matmuls (~2% here)."""
    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path, dim=128, ffn_dim=256)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", dtype)
    ids = tok.encode(CODE[:300])[:64]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, -1]
        from_file = llamacpp_logits(tmp_path / "m.gguf", torch.tensor([ids]))[-1]
    with LlamaCpp(tmp_path / "m.gguf", threads=1) as llm:
        theirs = torch.from_numpy(llm.eval(ids))
    assert relative_error(theirs, from_file) < 0.05
    assert relative_error(from_file, ours) > 1e-4  # the weights really are rounded: the check above is not trivial


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
