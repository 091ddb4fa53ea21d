"""MFU: the right peak for the GPU found (bf16 and FP8 apart) and causal attention counted as half."""

import dataclasses

import pytest

from codefoundry.config import ModelConfig
from codefoundry.model import Transformer
from codefoundry.presets import get_preset
from codefoundry.train.runtime import peak_flops_for_name


@pytest.mark.parametrize("name,bf16,fp8", [
    ("NVIDIA H100 80GB HBM3", 989.5e12, 1979e12),  # SXM
    ("NVIDIA H100 PCIe", 756.5e12, 1513e12),
    ("NVIDIA H100 NVL", 835.5e12, 1671e12),
    ("NVIDIA H200", 989.5e12, 1979e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 312e12),  # no FP8 tensor cores: the bf16 peak stays the bound
    ("NVIDIA B200", 2250e12, 4500e12),
    ("NVIDIA L4", 121e12, 242.5e12),
    ("NVIDIA L40S", 362.05e12, 733e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 330.3e12),
])
def test_peak_per_device_and_precision(name, bf16, fp8):
    assert peak_flops_for_name(name) == bf16
    assert peak_flops_for_name(name, "fp8-rowwise") == peak_flops_for_name(name, "tcfp12") == fp8


def test_unknown_gpu_has_no_peak():
    assert peak_flops_for_name("Some Future GPU") is None


def _attention_flops(cfg: ModelConfig, seq: int) -> float:
    model = Transformer(cfg)
    return model.flops_per_token(seq) - model.flops_per_token(0)


def test_causal_attention_counts_half_of_full():
    cfg = get_preset("tiny")
    c = cfg.n_layers * cfg.n_heads * cfg.head_dim
    # full attention: 4·T·H·d forward (QK^T and PV), x3 with backward = 12; causal half = 6
    assert _attention_flops(cfg, 1000) == 6 * c * 1000
    # differential attention: values twice as wide, so PV costs double: (2 + 4) / 2 * 3 = 9
    diff = dataclasses.replace(cfg, diff_attn=True)
    assert _attention_flops(diff, 1000) == 9 * c * 1000


def test_chunked_cross_entropy_is_the_default_for_large_vocabularies():
    assert Transformer(get_preset("tiny")).loss_chunk_rows() == 0
    big = dataclasses.replace(get_preset("tiny"), vocab_size=32768)
    assert Transformer(big).loss_chunk_rows() == 2048  # 2^26 logits
    assert Transformer(dataclasses.replace(big, vocab_size=49152)).loss_chunk_rows() == 1280
    assert Transformer(dataclasses.replace(big, loss_chunk=-1)).loss_chunk_rows() == 0
    assert Transformer(dataclasses.replace(big, loss_chunk=100)).loss_chunk_rows() == 100
