"""Every reference-run recipe resolves, trains 2 steps on its preset's tiny twin, and is costed by code."""

from __future__ import annotations

import pytest
import torch

from codefoundry.cli import main
from codefoundry.config import ConfigError
from codefoundry.model import Transformer
from codefoundry.presets import PRESETS
from codefoundry.recipe_cli import recipe_names, run_budget
from codefoundry.recipes import build_run_config

REFERENCE_RECIPES = [n for n in recipe_names() if n != "speedrun"]
# GPU-only matmul formats fall back to the default on CPU; TCFP-12 (pure PyTorch) stays on.
GPU_ONLY_PRECISION = ("fp8-tensorwise", "fp8-rowwise")


def tiny_twin(preset: str) -> str:
    twin = preset.split("-")[0] + "-tiny"
    assert twin in PRESETS, f"{preset} has no tiny twin"
    return twin


def test_every_reference_run_has_a_recipe():
    assert {"cf-150m", "cf-350m", "cf-1b", "cf-3b", "moe-60m", "moe-800m", "yxanul-197m", "yxanul-270m",
            "nanocode", "pythoncoder-1b"} <= set(REFERENCE_RECIPES)


@pytest.mark.parametrize("name", REFERENCE_RECIPES)
def test_recipe_trains_two_steps_on_its_tiny_twin(name, tiny_data, tmp_path):
    from codefoundry.train.trainer import pretrain

    run = build_run_config(None, name)
    assert run.preset in PRESETS and run.data.sources
    assert run.train.max_steps or run.train.epochs
    overrides = [f"train.data={tiny_data}", f"train.out={tmp_path}", "train.max_steps=2", "train.seq_len=32",
                 "train.batch_size=2", "train.grad_accum=1", "train.device=cpu", "train.dtype=fp32",
                 "train.compile=off", "train.save_every=0", "train.eval_every=0", "train.eval_batches=1",
                 "train.wandb_project=", "train.log_every=1", "train.warmup_steps=1"]
    if run.train.curriculum:
        overrides.append('train.curriculum="8:1"')  # the curriculum path, at test size (quoted: YAML reads 8:1 as 481)
    if run.train.linear_precision in GPU_ONLY_PRECISION:
        overrides.append("train.linear_precision=default")
    tiny = build_run_config(tiny_twin(run.preset), name, overrides)
    assert tiny.train.optimizer == run.train.optimizer and tiny.train.schedule == run.train.schedule
    summary = pretrain(tiny, show_progress=False)
    assert summary["steps"] == 2 and summary["finished"]
    assert summary["val_loss"] is not None and summary["val_loss"] == summary["val_loss"]  # finite, not NaN


def test_budget_is_the_model_flop_count():
    run = build_run_config(None, "nanocode")
    b = run_budget("nanocode", run, mfu=0.5)
    tc = run.train
    assert b.tokens == tc.max_steps * tc.batch_size * tc.grad_accum * tc.seq_len
    with torch.device("meta"):
        model = Transformer(run.model)
    assert b.flops == pytest.approx(model.flops_per_token(tc.seq_len) * b.tokens)
    assert b.hours_1gpu == pytest.approx(b.flops / (989.4e12 * 0.5) / 3600)
    assert b.hours_8gpu == pytest.approx(b.hours_1gpu / 8)


def test_curriculum_is_costed_stage_by_stage():
    run = build_run_config(None, "yxanul-197m")
    flat = build_run_config(None, "yxanul-197m", ["train.curriculum="])
    assert run_budget("y", run).flops < run_budget("y", flat).flops  # short rows cost less attention
    assert run_budget("y", run).tokens == run_budget("y", flat).tokens


def test_extends_changes_only_what_it_names():
    base, big = build_run_config(None, "cf-150m"), build_run_config(None, "cf-1b")
    assert big.preset == "cf-1b" and big.model.dim == 2048
    assert big.train == base.train and big.data == base.data


def test_recipe_errors_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: nanocode-tiny\ndata:\n  fim_rates: 0.5\n")
    with pytest.raises(ConfigError, match="data.fim_rates"):
        build_run_config(None, bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop\n")
    with pytest.raises(ConfigError, match="extends itself"):
        build_run_config(None, loop)
    with pytest.raises(ConfigError, match="data.val_by"):
        build_run_config(None, "nanocode", ["data.val_by=repo"])


def test_recipes_command_lists_every_recipe(capsys):
    assert main(["recipes", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    for name in REFERENCE_RECIPES:
        assert f"\n{name} " in out
    assert "50% MFU" in out
