import math

import pytest
import torch

from codefoundry.checkpoint import load_model
from codefoundry.errors import UserError
from codefoundry.model import Transformer
from codefoundry.recipes import build_run_config
from codefoundry.train.guard import StepGuard
from codefoundry.train.metrics import read_metrics
from codefoundry.train.smoke import make_synthetic_data
from codefoundry.train.trainer import pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_data(tmp_path_factory.mktemp("syn"))


def test_guard_verdicts_and_state():
    g = StepGuard(True, spike_factor=2.0, max_skips=4, warmup_steps=0)
    one, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    verdicts = [g.check(0, one, torch.tensor(0.5)), g.check(1, nan, torch.tensor(0.5)),
                g.check(2, one, torch.tensor(float("inf"))),
                g.check(3, torch.tensor(2.5), None),  # spike: > 2x the running mean
                g.check(4, torch.tensor(1.5), None)]
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in verdicts)  # decided on the device
    assert [bool(v) for v in verdicts] == [False, True, True, True, False]
    assert g.skipped == 3 and int(g.consecutive) == 0
    g.raise_if_stuck(4)  # 3 in a row < 4
    state = g.state_dict()
    h = StepGuard(True, 2.0, 3, 0)
    h.load_state_dict(state)
    assert h.state_dict() == state
    for step in range(3):
        assert h.check(step, nan, None)
    with pytest.raises(UserError, match="3 consecutive steps"):
        h.raise_if_stuck(2)
    assert StepGuard(False, 2.0, 3, 0).check(0, nan, None) is None


def _run(data, out, **over):
    overrides = [f"train.data={data}", f"train.out={out}", "train.max_steps=10", "train.seq_len=64",
                 "train.batch_size=4", "train.log_every=1", "train.warmup_steps=2"]
    return build_run_config("tiny", None, overrides + [f"{k}={v}" for k, v in over.items()])


def _poison(monkeypatch, bad_calls):
    """Make the model's training loss NaN on the given forward calls."""
    real, calls = Transformer.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        return out * float("nan") if self.training and calls["n"] in bad_calls else out
    monkeypatch.setattr(Transformer, "forward", forward)


def test_a_nan_step_is_skipped_and_logged(data, tmp_path, monkeypatch):
    _poison(monkeypatch, {5})
    summary = pretrain(_run(data, tmp_path), show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert summary["finished"] and summary["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in records].count(1) == 1
    assert all(math.isfinite(r["loss"]) for r in records)
    model, _ = load_model(tmp_path / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_failures_abort_with_a_clear_message(data, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(4, 100)))
    with pytest.raises(UserError, match="consecutive steps.*lower train.lr"):
        pretrain(_run(data, tmp_path, **{"train.max_skips": 3}), show_progress=False)


def test_training_steps_never_read_the_device(data, tmp_path, monkeypatch):
    """Between log records nothing is read back to the host: the guard's verdict, the loss and the
    counters stay on the device (a read there stalls a GPU every step)."""
    from codefoundry.train.engine import Trainer

    reads, inside = [], {"step": False}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **k):
            if inside["step"]:
                reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)
    real_step = Trainer.train_step

    def train_step(self):
        inside["step"] = True
        try:
            return real_step(self)
        finally:
            inside["step"] = False
    monkeypatch.setattr(Trainer, "train_step", train_step)
    summary = pretrain(_run(data, tmp_path, **{"train.log_every": 100, "train.max_steps": 5}), show_progress=False)
    assert summary["finished"] and reads == []
