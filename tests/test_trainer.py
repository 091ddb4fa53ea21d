import json

import pytest

from codefoundry.checkpoint import load_model, load_train_state
from codefoundry.data.loader import PackedLoader
from codefoundry.data.prepare import prepare
from codefoundry.data.sources import stdlib_root
from codefoundry.errors import UserError
from codefoundry.recipes import build_run_config
from codefoundry.train.metrics import read_metrics
from codefoundry.train.trainer import pretrain


def _run(data, out, steps=16, **over):
    overrides = [f"train.data={data}", f"train.out={out}", f"train.max_steps={steps}", "train.seq_len=64",
                 "train.batch_size=4", "train.log_every=1", "train.warmup_steps=3", "train.lr=3e-3",
                 "model.dropout=0.1"]  # dropout makes the RNG state part of what resume must restore
    overrides += [f"{k}={v}" for k, v in over.items()]
    return build_run_config("tiny", None, overrides)


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_loss_falls(tiny_data, tmp_path):
    summary = pretrain(_run(tiny_data, tmp_path, steps=40), show_progress=False)
    losses = _losses(tmp_path)
    assert summary["finished"] and len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert summary["val_loss"] is not None


def test_resume_reproduces_uninterrupted_run(tiny_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(_run(tiny_data, straight), show_progress=False)
    run = _run(tiny_data, split)
    first = pretrain(run, stop_after=7, show_progress=False)
    assert not first["finished"] and first["steps"] == 7
    pretrain(run, resume=True, show_progress=False)
    assert _losses(split) == _losses(straight)  # bit-identical, step for step
    assert len(_losses(split)) == 16


def test_time_budget_sizes_the_run(tiny_data, tmp_path):
    summary = pretrain(_run(tiny_data, tmp_path, steps=0, **{"train.minutes": 0.05}), show_progress=False)
    assert summary["finished"] and summary["total_steps"] >= 11
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["preset"] == "tiny"


def test_checkpoint_loads_for_inference(tiny_data, tmp_path):
    pretrain(_run(tiny_data, tmp_path, steps=2), show_progress=False)
    model, tok = load_model(tmp_path / "checkpoint")
    assert model.cfg.vocab_size == tok.vocab_size and not model.training


def test_bad_checkpoints_give_one_line_errors(tiny_data, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing")
    pretrain(_run(tiny_data, tmp_path, steps=2), show_progress=False)
    ckpt = tmp_path / "checkpoint"
    (ckpt / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="corrupt"):
        load_model(ckpt)
    (ckpt / "config.json").write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        load_model(ckpt)
    (ckpt / "train_state.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(UserError, match="corrupt"):
        pretrain(_run(tiny_data, tmp_path, steps=2), resume=True, show_progress=False)


def test_unprepared_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data prepare"):
        pretrain(_run(tmp_path, tmp_path / "out"), show_progress=False)


def _count_graphs(monkeypatch):
    """Compile through a backend that records each graph's input signature (shapes, grad mode) and
    whether any input is a symbolic size (a dynamic-shape graph)."""
    import torch

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        sig = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs)
        graphs.append({"sig": (sig, torch.is_grad_enabled()),
                       "dynamic": any(isinstance(t, torch.SymInt) for t in example_inputs)})
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=backend, **kw))
    return graphs


@pytest.mark.parametrize("setting", ["on", "off"])
def test_compile_setting_is_read_as_typed(tiny_data, tmp_path, monkeypatch, setting):
    from codefoundry.cli import main

    graphs = _count_graphs(monkeypatch)
    assert main(["pretrain", "--preset", "tiny", "--data", str(tiny_data), "--out", str(tmp_path), "train.max_steps=2",
                 "train.seq_len=64", "train.batch_size=4", f"train.compile={setting}", "train.device=cpu"]) == 0
    assert bool(graphs) == (setting == "on")


def test_curriculum_and_evaluation_never_recompile_a_graph(tiny_data, tmp_path, monkeypatch):
    graphs = _count_graphs(monkeypatch)
    run = _run(tiny_data, tmp_path, steps=6, **{"train.compile": "on", "train.curriculum": "16:2,32:4",
                                                 "train.eval_every": 2, "model.dropout": 0.0})
    pretrain(run, show_progress=False)
    assert graphs and not any(g["dynamic"] for g in graphs)  # static shapes throughout
    sigs = [g["sig"] for g in graphs]
    assert len(sigs) == len(set(sigs)), "a graph was compiled twice for the same shapes"
    # one training graph per row length (16, 32, 64), one evaluation graph (no grad)
    assert {len(sig[0]) > 0 for sig in sigs} == {True}
    assert sum(1 for sig in sigs if sig[1]) == 3 * sum(1 for sig in sigs if not sig[1])


def test_epochs_size_the_run_and_are_tracked(tiny_tokenizer, tmp_path):
    data = tmp_path / "data"
    prepare([stdlib_root() / "json"], tiny_tokenizer[0], data, val_fraction=0.0, show_progress=False)
    rows = PackedLoader(data / "train", 16, 64).n_rows
    run = _run(data, tmp_path / "out", steps=0, **{"train.epochs": 2, "train.batch_size": 16, "train.grad_accum": 2})
    summary = pretrain(run, show_progress=False)
    assert summary["finished"] and summary["total_steps"] == -(-2 * (rows // 16) // 2)
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert epochs[0] == 0 and epochs[-1] == 1 and epochs == sorted(epochs)
    assert load_train_state(tmp_path / "out" / "checkpoint")["loader"]["epoch"] == 1


def test_validation_loss_per_domain(tiny_tokenizer, tmp_path):
    data = tmp_path / "data"
    sources = [stdlib_root() / "logging", stdlib_root() / "email"]
    prepare(sources, tiny_tokenizer[0], data, val_fraction=0.3, val_by="source", show_progress=False)
    domains = sorted(d.name for d in (data / "val_by_source").iterdir())
    assert len(domains) == 2
    pretrain(_run(data, tmp_path / "out", steps=2, **{"data.val_by": "source"}), show_progress=False)
    val = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "val_loss" in r][-1]
    per_domain = [val[f"val_loss/{d}"] for d in domains]
    assert all(v > 0 for v in per_domain) and per_domain[0] != per_domain[1]
