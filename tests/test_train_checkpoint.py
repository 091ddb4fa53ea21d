"""Checkpoint manager: keep-last/best, atomic saves, and exact resume after a kill mid-save."""

import json

import pytest

from codefoundry.checkpoint import load_model
from codefoundry.errors import UserError
from codefoundry.recipes import build_run_config
from codefoundry.train import checkpoint as ckpt_mod
from codefoundry.train.metrics import read_metrics
from codefoundry.train.smoke import make_synthetic_data
from codefoundry.train.trainer import pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_data(tmp_path_factory.mktemp("syn"))


def _run(data, out, steps=12, **over):
    overrides = [f"train.data={data}", f"train.out={out}", f"train.max_steps={steps}", "train.seq_len=64",
                 "train.batch_size=4", "train.log_every=1", "train.warmup_steps=2", "train.save_every=4",
                 "model.dropout=0.1"]  # dropout: the RNG state is part of what resume must restore
    return build_run_config("tiny", None, overrides + [f"{k}={v}" for k, v in over.items()])


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_keeps_the_last_k_and_the_best(data, tmp_path):
    pretrain(_run(data, tmp_path, steps=16, **{"train.eval_every": 4, "train.keep_last": 2}), show_progress=False)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    best = (tmp_path / "checkpoint-best").resolve().name
    assert (tmp_path / "checkpoint").resolve().name == "step_00000016"
    assert {"step_00000012", "step_00000016", best} == set(saved)
    vals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r}
    assert best == f"step_{min(vals, key=vals.get):08d}"
    assert json.loads((tmp_path / "checkpoint-best" / "meta.json").read_text())["val_loss"] == min(vals.values())
    load_model(tmp_path / "checkpoint-best")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, not even `except Exception` handlers."""


def test_killed_mid_save_resumes_with_the_same_curve(data, tmp_path, monkeypatch):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    pretrain(_run(data, straight), show_progress=False)

    real_save = ckpt_mod.torch.save

    def dying_save(obj, path, *a, **k):
        if obj.get("step") == 8:
            (path.parent / "train_state.pt").write_bytes(b"half-written")
            raise Killed
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(Killed):
        pretrain(_run(data, crashed), show_progress=False)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert (crashed / "checkpoint").resolve().name == "step_00000004"  # the half save is invisible
    assert len(_losses(crashed)) == 8

    summary = pretrain(_run(data, crashed), resume="auto", show_progress=False)
    assert summary["finished"]
    assert _losses(crashed) == _losses(straight)  # no lost or repeated step, bit-identical
    assert not [p for p in (crashed / "checkpoints").iterdir() if p.name.startswith(".")]


def test_auto_resume_skips_a_corrupt_latest_and_starts_fresh_when_empty(data, tmp_path):
    summary = pretrain(_run(data, tmp_path, steps=4), resume="auto", show_progress=False)  # nothing yet: fresh
    assert summary["steps"] == 4
    pretrain(_run(data, tmp_path, steps=8), resume="auto", stop_after=8, show_progress=False)
    (tmp_path / "checkpoints" / "step_00000008" / "train_state.pt").write_bytes(b"junk")
    found = ckpt_mod.CheckpointManager(tmp_path).find_resume("auto")
    assert found[0].name == "step_00000004" and found[1]["step"] == 4
    (tmp_path / "checkpoints" / "step_00000004" / "train_state.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="corrupt"):
        ckpt_mod.CheckpointManager(tmp_path).find_resume("auto")


def test_cli_resume_auto_reads_the_saved_config(data, tmp_path):
    from codefoundry.cli import build_parser
    from codefoundry.train.cli import resolve_run

    parser = build_parser()
    args = parser.parse_args(["pretrain", "--preset", "tiny", "--out", str(tmp_path), "--resume"])
    assert args.resume == "auto" and resolve_run(args).train.out == str(tmp_path)  # no checkpoint yet: fresh
    pretrain(_run(data, tmp_path, steps=4, **{"train.lr": 1e-3}), show_progress=False)
    args = parser.parse_args(["pretrain", "--out", str(tmp_path), "--resume", "train.max_steps=6"])
    run = resolve_run(args)
    assert run.train.lr == 1e-3 and run.train.max_steps == 6 and run.preset == "tiny"


def _snapshot(root):
    return {str(p.relative_to(root)): (p.is_symlink(), p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_resuming_a_copied_run_writes_only_into_the_copy(data, tmp_path):
    """`pretrain --out NEW --resume auto` on a copy of a run: NEW continues from the copied
    checkpoint, and the original (here moved away, so its recorded directory is gone) is untouched."""
    import shutil

    from codefoundry.cli import main

    orig, new, moved = tmp_path / "orig", tmp_path / "new", tmp_path / "moved"
    common = ["train.seq_len=64", "train.batch_size=4", "train.log_every=1", "train.save_every=2", "train.keep_last=1",
              "train.device=cpu", "train.keep_best=false"]
    assert main(["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(orig), "train.max_steps=4",
                 *common]) == 0
    shutil.copytree(orig, new, symlinks=True)
    orig.rename(moved)
    before = _snapshot(moved)
    assert main(["pretrain", "--out", str(new), "--resume", "auto", "train.max_steps=6"]) == 0
    assert _snapshot(moved) == before and not orig.exists()
    assert [r["step"] for r in read_metrics(new / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in (new / "checkpoints").iterdir()] == ["step_00000006"]
    assert json.loads((new / "run_config.json").read_text())["train"]["out"] == str(new)


@pytest.mark.parametrize("damage", ["truncate", "empty", "remove"])
def test_resume_skips_a_checkpoint_with_broken_weights(data, tmp_path, capsys, damage):
    pretrain(_run(data, tmp_path, steps=8), show_progress=False)
    weights = tmp_path / "checkpoints" / "step_00000008" / "model.safetensors"
    if damage == "remove":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncate" else b"")
    capsys.readouterr()
    found = ckpt_mod.CheckpointManager(tmp_path).find_resume("auto")
    assert found[0].name == "step_00000004"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "step_00000008" in lines[0] and "model.safetensors" in lines[0]
    from codefoundry.cli import main

    assert main(["pretrain", "--out", str(tmp_path), "--resume"]) == 0  # through the CLI: one line, not two
    out = capsys.readouterr().out
    assert out.count("resume: skipping") == 1 and '"finished": true' in out


def test_an_edited_config_names_the_mismatch(data, tmp_path):
    pretrain(_run(data, tmp_path, steps=1), show_progress=False)
    config = tmp_path / "checkpoint" / "config.json"
    raw = json.loads(config.read_text())
    raw["model"]["dim"], raw["model"]["ffn_dim"], raw["model"]["head_dim"] = 96, 0, 0
    config.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"dim=96.*embed\.weight of shape \[\d+, 96\].*model.safetensors holds \[\d+, 64\]"):
        load_model(tmp_path / "checkpoint")
