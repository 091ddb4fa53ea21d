"""RoPE context extension: HF-compatible YaRN tables, and a toy model evaluated past its training length."""

import dataclasses

import pytest
import torch

from codefoundry.config import ModelConfig
from codefoundry.model import Transformer
from codefoundry.model.rope import rope_frequencies

VOCAB, PERIOD, TRAIN_LEN = 16, 6, 32


def test_yarn_matches_hf_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(dim=512, n_heads=8, rope_theta=10000.0, rope_scaling="yarn", rope_factor=4.0,
                      rope_original_max_len=2048, max_seq_len=8192)
    hf = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=8192,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 2048})
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    inv, scale = rope_frequencies(cfg)
    torch.testing.assert_close(inv, hf_inv.float())
    assert scale == pytest.approx(hf_scale)


def test_llama3_matches_hf_transformers():
    """Llama 3.1's rope scaling (factor 8, low 1, high 4, original 8192), on a head size whose frequencies
    fall in all three bands."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(dim=512, n_heads=4, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0,
                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
                      max_seq_len=131072)
    hf = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072,
                                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    inv, scale = rope_frequencies(cfg)
    plain, _ = rope_frequencies(dataclasses.replace(cfg, rope_scaling="none"))
    torch.testing.assert_close(inv, hf_inv.float())
    assert scale == hf_scale == 1.0
    kept, divided = torch.isclose(inv, plain), torch.isclose(inv, plain / 8)
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # all three bands exercised


def periodic(gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """A random block of PERIOD tokens repeated: after the first block every token is a copy."""
    block = torch.randint(1, VOCAB, (batch, PERIOD), generator=gen)
    return block.repeat(1, length // PERIOD + 1)[:, :length + 1]


def test_scaled_rope_degrades_less_past_the_training_length():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=TRAIN_LEN)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        seq = periodic(gen, 16, TRAIN_LEN)
        model(seq[:, :-1], seq[:, 1:]).backward()
        opt.step()
        opt.zero_grad()

    seq = periodic(torch.Generator().manual_seed(1), 32, 4 * TRAIN_LEN)
    beyond = seq[:, 1:].clone()
    beyond[:, :TRAIN_LEN] = -100  # score only the positions past the training length
    losses = {}
    for scaling in ("none", "ntk", "yarn"):
        long_cfg = dataclasses.replace(cfg, rope_scaling=scaling, rope_factor=4.0, rope_original_max_len=TRAIN_LEN,
                                       max_seq_len=4 * TRAIN_LEN)
        extended = Transformer(long_cfg).eval()
        extended.load_state_dict(model.state_dict())
        with torch.no_grad():
            losses[scaling] = extended(seq[:, :-1], beyond).item()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses["ntk"] < losses["none"] and losses["yarn"] < losses["none"]
    assert losses["yarn"] < 0.5 * losses["none"]
