import json

import pytest

from codefoundry.cli import main
from codefoundry.errors import UserError
from codefoundry.train.metrics import MetricsLog, read_metrics
from codefoundry.train.plot import plot_run


def test_resumed_log_drops_steps_past_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    MetricsLog(tmp_path / "metrics.jsonl", resume_step=3).log({"step": 4, "loss": 0.3})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_plot_draws_every_panel_with_data(tmp_path):
    records = [{"step": s, "loss": 5 - s / 10, "lr": 1e-3, "grad_norm": 1.0, "tok_per_s": 1000.0,
                "moe_load_max": 1.2, "moe_load_cv": 0.1} for s in range(1, 20)] + [{"step": 19, "val_loss": 3.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    png = plot_run(tmp_path, tmp_path / "m.png")
    assert png.stat().st_size > 10_000
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no metrics"):
        plot_run(tmp_path / "empty.jsonl", tmp_path / "e.png")


def test_optional_dashboards_explain_the_missing_extra(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="logging"):
        MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)


def test_smoke_test_command(tmp_path, capsys):
    assert main(["pretrain", "--smoke-test", "--out", str(tmp_path)]) == 0
    assert "smoke test passed" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
