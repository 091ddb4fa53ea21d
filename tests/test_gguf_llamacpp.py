"""Our GGUF export as llama.cpp itself reads it (the prebuilt library in llama-cpp-py-sync):
its tokenizer gives our ids, and greedy decoding gives our tokens from logits close to ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export_common import CODE, make_checkpoint

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


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"tie_embeddings": False, "bias": True,
                                                                "mlp": "relu2"}],
                         ids=["llama", "qwen3", "arcee-untied-bias"])
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
    scale = float(our_logits.abs().max())
    err = float((our_logits - torch.from_numpy(their_logits)).abs().max())
    assert err <= 1e-3 * scale, f"max |logit diff| {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1"])
def test_llamacpp_runs_our_quantized_exports_close_to_ours(tiny_tokenizer, tmp_path, dtype):
    """Block-quantized files load and decode; their logits stay near the exact model's (4-bit: loosely)."""
    tok, tok_path = tiny_tokenizer
    model = make_checkpoint(tmp_path / "ckpt", tok_path, init_std=0.2, dim=128, ffn_dim=256)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", dtype)
    prompt = tok.encode(CODE[:300])
    with torch.no_grad():
        _, our_logits = our_greedy(model, prompt)
    with LlamaCpp(tmp_path / "m.gguf", threads=1) as llm:
        their_first = llm.eval(prompt)
    ours = our_logits[0]
    rel = float((ours - torch.from_numpy(their_first)).norm() / ours.norm())
    assert rel < (0.05 if dtype == "q8_0" else 0.3), f"relative logit error {rel:.3f}"
    assert rel > 1e-4  # the file really is quantized: an exact copy would agree to float rounding
