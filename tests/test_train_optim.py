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
