"""Every preset: pinned parameter count, near its nominal size; every tiny preset trains and generates."""

import pytest
import torch

from codefoundry.model import Transformer
from codefoundry.presets import PRESETS, features, get_preset

# name: (total params, active params per token, nominal size or None where the stated
# dimensions cannot reach it, see the notes in codefoundry/presets.py)
PINNED = {
    "cf-150m": (148_656_384, 148_656_384, 150e6),
    "cf-350m": (358_666_240, 358_666_240, 350e6),
    "cf-1b": (1_006_739_456, 1_006_739_456, 1e9),
    "cf-3b": (3_013_776_896, 3_013_776_896, 3e9),
    "moe-60m": (56_888_840, 54_529_544, 60e6),
    "moe-800m": (4_379_224_128, 1_661_315_136, None),  # stated dims: 4.38B total / 1.66B active
    "yxanul-197m": (195_865_344, 195_865_344, 197e6),
    "yxanul-270m": (273_467_264, 273_467_264, 270e6),
    "nanocode-124m": (135_266_304, 135_266_304, 124e6),
    "pythoncoder-1b": (778_667_520, 778_667_520, None),  # stated dims + 49k vocab: 0.78B
}
TINY = ["tiny", "cf-tiny", "moe-tiny", "yxanul-tiny", "nanocode-tiny", "pythoncoder-tiny"]


def _meta_model(name: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(get_preset(name))


@pytest.mark.parametrize("name", sorted(PINNED))
def test_parameter_count_is_pinned_and_near_nominal(name):
    total, active, nominal = PINNED[name]
    model = _meta_model(name)
    assert model.num_params() == total
    assert model.num_active_params() == active
    if nominal is not None:
        assert abs(total - nominal) / nominal < 0.10


def test_every_preset_is_pinned_or_tiny():
    assert set(PRESETS) == set(PINNED) | set(TINY) | {"speedrun-cpu"}


def test_reference_dimensions():
    """The stated dimensions of each reference design (the specification)."""
    def dims(name):
        c = get_preset(name)
        return c.dim, c.n_layers, c.n_heads, c.n_kv_heads

    assert [dims(n) for n in ("cf-150m", "cf-350m", "cf-1b", "cf-3b")] == [
        (768, 12, 12, 4), (1024, 24, 16, 4), (2048, 24, 16, 8), (3072, 26, 24, 8)]
    m60, m800 = get_preset("moe-60m"), get_preset("moe-800m")
    assert (dims("moe-60m"), m60.ffn_dim, m60.n_experts) == ((512, 1, 8, 2), 768, 4)
    assert (dims("moe-800m"), m800.ffn_dim, m800.n_experts) == ((1536, 24, 24, 8), 4096, 8)
    assert m800.moe_top_k == 2 and m800.moe_shared_experts == 1 and m800.moe_group_top_k == 1
    assert m800.attn_sinks and m800.rope_scaling == "yarn" and m800.rope_original_max_len == 2048
    assert get_preset("yxanul-197m").n_layers == get_preset("yxanul-270m").n_layers == 28
    nano = get_preset("nanocode-124m")
    assert dims("nanocode-124m")[:3] == (768, 12, 6) and nano.vocab_size == 32768
    assert nano.mlp == "relu2" and nano.logit_softcap == 15 and not nano.norm_learnable and not nano.bias
    pc = get_preset("pythoncoder-1b")
    assert (dims("pythoncoder-1b"), pc.head_dim, pc.ffn_dim, pc.max_seq_len) == ((1536, 24, 12, 4), 128, 4096, 8192)
    assert pc.diff_attn and pc.mtp_heads == 1 and pc.dropout == 0.1 and pc.rope_original_max_len == 2048


def test_features_lists_the_switches():
    assert "MoE 8xSwiGLU top-2" in features(get_preset("moe-800m"))
    assert "frozen QK-norm" in features(get_preset("cf-150m"))
    assert "diff-attn" in features(get_preset("pythoncoder-1b"))


def _bigram_batch(gen: torch.Generator, vocab: int, batch: int = 8, seq: int = 33) -> torch.Tensor:
    """Rows following x[t+1] = (5 x[t] + 3) mod V' from a random start: learnable in a few steps."""
    v = min(vocab, 97)
    start = torch.randint(0, v, (batch, 1), generator=gen)
    steps = torch.arange(seq)
    rows = [start]
    for _ in steps[1:]:
        rows.append((5 * rows[-1] + 3) % v)
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_trains_and_generates_with_cache(name):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = Transformer(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(12):
        seq = _bigram_batch(gen, cfg.vocab_size)
        loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.post_step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])

    model.eval()
    prompt = _bigram_batch(gen, cfg.vocab_size, batch=2, seq=5)
    cache = model.new_cache(2, 16)
    logits = model(prompt, cache=cache)[:, -1]
    seq = prompt
    for _ in range(6):
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        full = model(seq)[:, -1]  # no cache: the whole sequence again
        logits = model(nxt, cache=cache)[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


def test_presets_cli_prints_total_and_active(capsys):
    from codefoundry.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("moe-800m"))
    assert "4379.2M" in line and "1661.3M" in line and "sinks" in line

