"""MoE: batched dispatch equals a per-token reference, routing limits, balancing, metrics."""

import pytest
import torch

from codefoundry.config import ConfigError, ModelConfig
from codefoundry.model import Transformer
from codefoundry.model.moe import MoE


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, ffn_dim=48, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64,
                n_experts=8, moe_top_k=2, moe_groups=4, moe_group_top_k=2)
    return ModelConfig(**{**base, **kw})


def naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: sum of gate * expert(token) over its chosen experts, plus shared experts."""
    flat = x.reshape(-1, x.shape[-1])
    experts, gates, _ = moe.route(flat)
    rows = []
    for n in range(flat.shape[0]):
        y = sum(gates[n, j] * moe.experts[int(experts[n, j])](flat[n]) for j in range(moe.top_k))
        rows.append(y + sum(s(flat[n]) for s in moe.shared_experts))
    return torch.stack(rows).view_as(x)


def test_dispatch_equals_naive_reference():
    torch.manual_seed(0)
    moe = MoE(cfg())
    moe.expert_bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(moe(x), naive(moe, x), atol=1e-5, rtol=1e-5)


def test_group_limited_routing_and_bias_only_affects_selection():
    torch.manual_seed(0)
    moe = MoE(cfg(moe_groups=4, moe_group_top_k=1))  # groups of 2 experts, one group per token
    x = torch.randn(50, 32)
    experts, gates, scores = moe.route(x)
    assert torch.equal(experts[:, 0] // 2, experts[:, 1] // 2)  # both experts from one group
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    moe.expert_bias.fill_(0)
    moe.expert_bias[5] = 10.0  # forces expert 5 into every selection ...
    experts, gates, scores = moe.route(x)
    assert (experts == 5).any(-1).all()
    chosen = scores.gather(1, experts)  # ... but gates still come from the unbiased scores
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))


def _load_cv(rate: float) -> float:
    """Coefficient of variation of expert load over the last steps of a skewed token stream."""
    torch.manual_seed(0)
    model = Transformer(cfg(moe_bias_rate=rate, moe_groups=1, moe_group_top_k=1))
    moe = model.blocks[0].mlp
    skew = torch.randn(32)
    with torch.no_grad():
        moe.router.weight[0] += 0.5 * skew  # experts 0 and 1 love the common direction
        moe.router.weight[1] += 0.4 * skew
    gen = torch.Generator().manual_seed(1)
    for step in range(300):
        x = torch.randn(256, 32, generator=gen) * 0.5 + skew
        with torch.no_grad():
            moe(x)
        if step == 199:
            moe.load_fractions()  # measure the last 100 steps only
        model.post_step()
    fractions = moe.load_fractions()
    return float(fractions.std(unbiased=False) / fractions.mean())


def test_aux_loss_free_bias_evens_out_skewed_load():
    off, on = _load_cv(0.0), _load_cv(1e-2)
    assert off > 1.0  # two experts take almost everything
    assert on < 0.25 * off


def test_training_metrics_report_router_load():
    torch.manual_seed(0)
    model = Transformer(cfg(moe_aux_loss=0.01))
    x = torch.randint(0, 64, (2, 16))
    loss = model(x, x)
    loss.backward()
    model.post_step()
    metrics = model.extra_metrics()
    assert set(metrics) == {"moe_aux_loss", "moe_load_cv", "moe_load_max"}
    assert metrics["moe_load_max"] >= 1.0 and metrics["moe_aux_loss"] > 0
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # the aux loss reaches the router
    model.eval()
    assert model(x, x) < loss  # eval loss: plain cross-entropy, no aux term


def test_bias_is_saved_with_the_weights():
    model = Transformer(cfg())
    assert "blocks.0.mlp.expert_bias" in model.state_dict()
    assert "blocks.0.mlp.load_pending" not in model.state_dict()
    assert "blocks.0.mlp.experts.7.gate_proj.weight" in model.state_dict()
    assert "blocks.0.mlp.shared_experts.0.down_proj.weight" in model.state_dict()


def test_active_params_count_only_chosen_experts():
    model = Transformer(cfg(moe_shared_experts=1))
    per_expert = 3 * 32 * 48
    assert model.num_params() - model.num_active_params() == (8 - 2) * per_expert


@pytest.mark.parametrize("bad", [dict(moe_groups=3), dict(moe_top_k=5, moe_group_top_k=2), dict(moe_group_top_k=5)])
def test_invalid_routing_config(bad):
    with pytest.raises(ConfigError):
        cfg(**bad)


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_gemm_dispatch_equals_dense_dispatch_in_bf16(monkeypatch, bias):
    """The GPU path (sorted rows, torch._grouped_mm) against the all-experts path, forward and backward."""
    import codefoundry.model.moe as moe_module

    assert moe_module.moe_dispatch(torch.device("cpu"), torch.float32) == "dense"
    assert moe_module.moe_dispatch(torch.device("cpu"), torch.bfloat16) == "grouped"
    assert moe_module.moe_dispatch(torch.device("cpu"), torch.float32) == "dense"
    assert moe_module.moe_dispatch(torch.device("cpu"), torch.bfloat16) == "grouped"
    torch.manual_seed(0)
    moe = MoE(cfg(bias=bias, moe_shared_experts=0))
    x = torch.randn(3, 7, 32, requires_grad=True)
    results = {}
    for kind in ("grouped", "dense"):
        monkeypatch.setattr(moe_module, "moe_dispatch", lambda device, dtype, kind=kind: kind)
        with torch.autocast("cpu", torch.bfloat16):
            out = moe(x)
        out.float().square().sum().backward()
        results[kind] = (out.float(), x.grad.clone(), moe.experts[3].down_proj.weight.grad.clone())
        x.grad = None
        moe.zero_grad()
    for got, want in zip(results["grouped"], results["dense"]):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def _bias_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(cfg(moe_bias_rate=0.1))
    gen = torch.Generator().manual_seed(100 + rank)  # each rank routes different tokens
    for _ in range(3):
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 16), generator=gen))
        model.post_step()
    torch.save(model.blocks[0].mlp.expert_bias, f"{out}/bias{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_bias_stays_identical_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_bias_rank, args=(2, port, str(tmp_path)), nprocs=2)
    b0, b1 = torch.load(tmp_path / "bias0.pt"), torch.load(tmp_path / "bias1.pt")
    assert b0.abs().sum() > 0
    torch.testing.assert_close(b0, b1, atol=0, rtol=0)
