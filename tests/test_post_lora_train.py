"""`sft --lora` / `dpo --lora`: only adapters train, checkpoints are plain merged models, the adapter is
saved beside them, resume is exact, and two DDP ranks match one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers_post import make_checkpoint
from test_post_dpo import PAIRS as DPO_PAIRS
from test_post_sft import _free_port, _logged, _sft_run, write_data

from codefoundry.checkpoint import load_model
from codefoundry.cli import main
from codefoundry.post import sft as sft_module
from codefoundry.post.finetune import finetune_config
from codefoundry.post.sft import SFT_DEFAULTS, sft

pytest.importorskip("peft")

from codefoundry.post.lora import LoraWeights, load_adapter, merge_lora

SPEC = "r=4,alpha=8,targets=q_proj,v_proj"


def test_sft_lora_trains_only_adapters_and_saves_a_merged_checkpoint(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "base")
    base, _ = load_model(ckpt)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    seen: list[LoraWeights] = []

    class Recorded(LoraWeights):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(sft_module, "LoraWeights", Recorded)
    run = finetune_config(ckpt, SFT_DEFAULTS, ["train.lr=1e-2", "train.max_steps=30", "train.batch_size=4",
                                               "train.seq_len=64", "train.warmup_steps=2", "train.log_every=10",
                                               "train.device=cpu"], tmp_path / "run")
    summary = sft(ckpt, write_data(tmp_path), run, show_progress=False, lora="r=8,alpha=16,targets=all-linear")
    assert summary["final"]["loss"] < 0.9 * summary["first"]["loss"]  # 6.28 -> 5.36 measured

    trained = seen[0].model  # the unmerged model the engine trained
    lora_state = trained.state_dict()
    for key, value in base_state.items():  # every base weight bit-identical (peft keeps them under .base_layer)
        key = key if key in lora_state else key.replace(".weight", ".base_layer.weight")
        assert torch.equal(lora_state[key], value), key
    assert float(trained.blocks[0].attn.q_proj.lora_B["default"].weight.detach().abs().max()) > 0  # B starts at 0: it moved

    state = torch.load(Path(summary["checkpoint"]) / "train_state.pt", weights_only=False)
    n_adapters = 2 * 7 * len(trained.blocks)  # A and B, seven targets, every block
    assert len(state["partial"]) == n_adapters and all("lora_" in k for k in state["partial"])
    assert sum(len(g["params"]) for opt in state["optimizer"] for g in opt["param_groups"]) == n_adapters

    merged, _ = load_model(summary["checkpoint"])  # a plain checkpoint: the ordinary loader reads it
    expected = merge_lora(load_adapter(load_model(ckpt)[0], tmp_path / "run" / "adapter")).state_dict()
    assert set(merged.state_dict()) == set(base_state)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key])
        if "_proj" not in key:  # embedding, norms: no adapter
            assert torch.equal(value, base_state[key]), key
    assert not torch.equal(merged.state_dict()["blocks.0.attn.q_proj.weight"],
                           base_state["blocks.0.attn.q_proj.weight"])
    assert summary["trainable_params"] == sum(v.numel() for v in state["partial"].values())


def test_killed_sft_lora_resumes_with_the_same_curve(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "base")
    data = write_data(tmp_path)
    args = ["--checkpoint", str(ckpt), *[a for s in data for a in ("--data", f"{s.location}@{s.weight}")],
            "--lora", SPEC, "train.max_steps=6", "train.batch_size=2", "train.seq_len=64", "train.log_every=1",
            "train.warmup_steps=1", "train.lr=3e-3", "train.device=cpu", "train.save_every=2"]
    assert main(["sft", "--out", str(tmp_path / "straight"), *args]) == 0
    assert main(["sft", "--out", str(tmp_path / "split"), "--stop-after", "3", *args]) == 0
    assert main(["sft", "--out", str(tmp_path / "split"), "--resume", *args]) == 0
    assert _logged(tmp_path / "split") == _logged(tmp_path / "straight")  # bit-identical, step for step
    assert len(_logged(tmp_path / "straight")) == 6
    without = [a for a in args if a not in ("--lora", SPEC)]
    capsys.readouterr()
    assert main(["sft", "--out", str(tmp_path / "split"), "--resume", *without, "train.max_steps=8"]) != 0
    assert "was trained with adapters (--lora)" in capsys.readouterr().err


def test_dpo_lora_runs_against_the_frozen_base(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in DPO_PAIRS) + "\n")
    ckpt = make_checkpoint(tmp_path / "base", seed=1)
    assert main(["dpo", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--lora", "r=4,alpha=8,targets=all-linear", "train.lr=5e-3", "train.max_steps=8",
                 "train.batch_size=4", "train.warmup_steps=0", "train.log_every=5", "train.device=cpu"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_set"]["reward_margin"] > 0 and summary["reference"] == str(ckpt)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    merged, _ = load_model(summary["checkpoint"])
    expected = merge_lora(load_adapter(load_model(ckpt)[0], tmp_path / "run" / "adapter")).state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key])


def _lora_rank(rank, world, port, ckpt, sources, run):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from codefoundry.train.distributed import shutdown

    sft(ckpt, sources, run, show_progress=False, lora=SPEC)
    shutdown()


def test_sft_lora_on_two_ranks_matches_one_process(tmp_path):
    ckpt = make_checkpoint(tmp_path / "base")
    sources = write_data(tmp_path)
    sft(ckpt, sources, _sft_run(ckpt, tmp_path / "one", 4), show_progress=False, lora=SPEC)
    mp.start_processes(_lora_rank, args=(2, _free_port(), ckpt, sources, _sft_run(ckpt, tmp_path / "two", 2)),
                       nprocs=2, start_method="spawn")
    assert _logged(tmp_path / "two") == pytest.approx(_logged(tmp_path / "one"), rel=2e-4)
    assert len(_logged(tmp_path / "two")) == 4
