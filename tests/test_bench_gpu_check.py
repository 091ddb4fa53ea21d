"""bench/gpu_check.py: without CUDA it says so and exits 0; --cpu-smoke runs its GPU code path on tiny twins."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_exits_zero_with_a_notice(capsys, monkeypatch):
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_cpu_smoke_runs_every_precision(capsys):
    gpu_check = _gpu_check()
    assert gpu_check.main(["--cpu-smoke", "--presets", "moe-60m", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("bf16", "fp8-tw", "fp8-rw", "tcfp12"):
        assert f"moe-60m          {label}" in out
    assert "all rows ran" in out and "FAILED" not in out


def test_a_crash_makes_the_exit_status_nonzero(capsys, monkeypatch):
    gpu_check = _gpu_check()

    def boom(*args):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(gpu_check, "measure", boom)
    assert gpu_check.main(["--cpu-smoke", "--presets", "cf-150m", "--precisions", "default"]) == 1
    assert "FAILED: RuntimeError: no kernel" in capsys.readouterr().out
