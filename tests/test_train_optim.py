import pytest
import torch

from codefoundry.config import TrainConfig
from codefoundry.model import Transformer
from codefoundry.presets import get_preset
from codefoundry.recipes import build_run_config
from codefoundry.train.metrics import read_metrics
from codefoundry.train.optim import build_optimizer, param_groups
from codefoundry.train.smoke import make_synthetic_data
from codefoundry.train.trainer import pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_data(tmp_path_factory.mktemp("syn"))


def _losses(data, out, steps=6, **over):
    overrides = [f"train.data={data}", f"train.out={out}", f"train.max_steps={steps}", "train.seq_len=64",
                 "train.batch_size=4", "train.log_every=1", "train.warmup_steps=2", "train.nan_guard=false"]
    pretrain(build_run_config("tiny", None, overrides + [f"{k}={v}" for k, v in over.items()]), show_progress=False)
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_param_groups_split_embedding_matrices_and_gains():
    model = Transformer(get_preset("tiny"))
    groups = param_groups(model)
    assert groups["embed"] == [model.embed.weight]  # tied head: the same tensor, listed once
    assert all(p.dim() == 2 for p in groups["matrix"]) and all(p.dim() == 1 for p in groups["other"])
    opt = build_optimizer(model, TrainConfig(lr=1e-3, embed_lr_ratio=0.5, weight_decay=0.1), torch.device("cpu"))
    by_first = {id(g["params"][0]): g for g in opt.param_groups}
    assert by_first[id(model.embed.weight)]["lr"] == pytest.approx(5e-4)
    assert by_first[id(model.embed.weight)]["weight_decay"] == 0.0
    assert by_first[id(groups["matrix"][0])]["weight_decay"] == 0.1
    assert by_first[id(groups["other"][0])]["weight_decay"] == 0.0
    opt.set_lr_factor(0.5)
    assert by_first[id(model.embed.weight)]["lr"] == pytest.approx(2.5e-4)


def test_muon_takes_hidden_matrices_and_trains(data, tmp_path):
    model = Transformer(get_preset("tiny"))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon, adam = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adam, torch.optim.AdamW)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for p in param_groups(model)["matrix"]}
    losses = _losses(data, tmp_path, steps=20, **{"train.optimizer": "muon"})
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_grad_accumulation_matches_the_large_batch(data, tmp_path):
    big = _losses(data, tmp_path / "big")
    accum = _losses(data, tmp_path / "accum", **{"train.batch_size": 2, "train.grad_accum": 2})
    assert accum == pytest.approx(big, rel=1e-5)


def test_activation_checkpointing_and_chunked_loss_do_not_change_the_math(data, tmp_path):
    plain = _losses(data, tmp_path / "plain", steps=4)
    ckpt = _losses(data, tmp_path / "ckpt", steps=4, **{"train.activation_checkpointing": True,
                                                         "model.loss_chunk": 48})
    assert ckpt == pytest.approx(plain, rel=1e-5)


SHAPES = [(8, 16), (16, 8), (12, 12), (4, 20), (20, 4)]


def _muon_params_and_grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _muon_rank(rank, world, port, out):
    import os

    import torch.distributed as dist

    import codefoundry.train.muon as muon_mod

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = {"n": 0}
    real = muon_mod._zeropower_via_newtonschulz

    def counted(*args):
        calls["n"] += 1
        return real(*args)
    muon_mod._zeropower_via_newtonschulz = counted
    params = [torch.nn.Parameter(p) for p in _muon_params_and_grads(-1)]
    opt = muon_mod.DistributedMuon(params, world, rank, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        for p, g in zip(params, _muon_params_and_grads(step)):
            p.grad = g
        opt.step()
    torch.save({"params": [p.detach() for p in params], "calls": calls["n"]}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_muon_splits_orthogonalisation_across_ranks_with_the_same_result(tmp_path):
    import socket

    import torch.multiprocessing as mp

    params = [torch.nn.Parameter(p) for p in _muon_params_and_grads(-1)]
    ref = torch.optim.Muon(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        for p, g in zip(params, _muon_params_and_grads(step)):
            p.grad = g
        ref.step()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_muon_rank, args=(2, port, tmp_path), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["calls"] for r in ranks] == [3 * 3, 3 * 2]  # matrices 0,2,4 on rank 0; 1,3 on rank 1; 3 steps
    for r in ranks:
        for got, want in zip(r["params"], params):
            assert torch.equal(got, want.detach())  # bit-identical to torch.optim.Muon in one process


def test_a_skipped_step_changes_nothing():
    model = Transformer(get_preset("tiny"))
    for optimizer in ("adamw", "muon"):
        opt = build_optimizer(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(skip=torch.tensor(True))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step(skip=torch.tensor(False))
        assert all(torch.isfinite(p).all() for p in model.parameters())  # no NaN left in the optimizer state
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
