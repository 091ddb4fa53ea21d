"""The whole pipeline at toy size, through the real CLI entry point."""

import json

import pytest

from codefoundry.cli import main
from codefoundry.config import ConfigError
from codefoundry.recipes import build_run_config
from tests.conftest import TINY_SOURCES


def test_speedrun_end_to_end(tmp_path, bad_files, capsys):
    out = tmp_path / "sr"
    srcs = [f"--source={s}" for s in [*TINY_SOURCES[:2], bad_files]]
    rc = main(["speedrun", *srcs, f"--out={out}", "--minutes=0.05", "--vocab-size=400", "--val-fraction=0.2",
               "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "train.seq_len=64",
               "train.batch_size=4"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    ev = results["eval"]
    assert ev["bpb"] > 0 and set(ev["baselines"]) == {"gzip -9", "xz -9e"}
    report = (out / "report.md").read_text()
    assert "bits per byte" in report and "gzip -9" in report and f"{ev['bpb']:.3f}" in report
    assert (out / "loss.png").stat().st_size > 1000
    meta = json.loads((out / "data" / "train" / "metadata.json").read_text())
    assert meta["skipped"]["counts"] == {"non_utf8": 1, "empty": 1, "binary": 1}
    for stage in ("tokenizer", "data", "pretrain", "eval", "samples"):
        assert stage in results["timings"]

    # Each stage also works on its own, on what the speedrun wrote.
    ckpt = out / "run" / "checkpoint"
    capsys.readouterr()
    assert main(["generate", f"--checkpoint={ckpt}", "--prompt=def f(x):\n", "--max-new-tokens=8",
                 "--temperature=0"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):\n")
    assert main(["eval", "bpb", f"--checkpoint={ckpt}", f"--data={out / 'data' / 'val'}", "--seq-len=64",
                 "--stride=32"]) == 0
    assert json.loads(capsys.readouterr().out)["bpb"] == pytest.approx(ev["bpb"], rel=1e-4)
    assert main(["plot", str(out / "run")]) == 0


def test_stage_commands(tmp_path, capsys):
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", f"--source={TINY_SOURCES[0]}", "--vocab-size=300", f"--out={tok}"]) == 0
    assert main(["data", "prepare", f"--source={TINY_SOURCES[0]}", f"--tokenizer={tok}", f"--out={tmp_path / 'd'}",
                 "--val-fraction=0"]) == 0
    assert main(["pretrain", "--preset=tiny", f"--data={tmp_path / 'd'}", f"--out={tmp_path / 'r'}",
                 "train.max_steps=3", "train.seq_len=32", "train.batch_size=2"]) == 0
    assert (tmp_path / "r" / "checkpoint" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "r" / "run_config.json").read_text())["train"]["max_steps"] == 3


@pytest.mark.parametrize("argv, message", [
    (["generate", "--checkpoint=/nonexistent/ckpt", "--prompt=x"], "not found"),
    (["pretrain", "--preset=nope", "train.max_steps=1"], "unknown preset"),
    (["pretrain", "--preset=tiny", "train.bogus=1"], "unknown config key"),
    (["pretrain", "--preset=tiny", "train.lr=fast"], "cannot read"),
    (["data", "prepare", "--source=/nonexistent", "--tokenizer=/nonexistent.json", "--out=/tmp/x"], "not found"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_config_layers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: tiny\nmodel:\n  dim: 128\ntrain:\n  lr: 1.0e-3\n")
    run = build_run_config(None, recipe, ["train.lr=2e-3", "model.n_heads=8"])
    assert run.preset == "tiny" and run.train.lr == 2e-3
    assert run.model.dim == 128 and run.model.head_dim == 16  # derived fields follow their inputs
    with pytest.raises(ConfigError):
        build_run_config("tiny", None, ["model.n_kv_heads=3"])
