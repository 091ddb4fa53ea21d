"""DPO: zero margin against itself at the start, larger margin and full accuracy after training;
preference pairs built from executed tests."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers_post import make_checkpoint, tiny_checkpoint

from codefoundry.checkpoint import load_model
from codefoundry.post.builders import preference_pairs_from_tests
from codefoundry.post.dpo import DPO_DEFAULTS, dpo, evaluate_margins, load_pairs
from codefoundry.post.finetune import finetune_config
from codefoundry.post.sft_data import LoadReport, Source
from codefoundry.tokenizer.chat import render_chat
from codefoundry.train.metrics import read_metrics

PAIRS = [
    {"prompt": "sum of a list", "chosen": "return sum(xs)", "rejected": "return max(xs)"},
    {"prompt": "length of a string", "chosen": "return len(s)", "rejected": "return s"},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first item"}],
     "chosen": "return xs[0]", "rejected": "return xs[-1]"},
    {"prompt": "double it", "chosen": "return 2 * x", "rejected": "return x"},
]


def test_dpo_raises_margin_on_training_pairs(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS + [{"prompt": "x", "chosen": "same", "rejected": "same"},
                                                                {"prompt": "no replies"}]) + "\n")
    ckpt = make_checkpoint(tmp_path / "base", seed=1)
    model, tok = load_model(ckpt)
    report = LoadReport()
    pairs = load_pairs(Source(str(data)), tok, 128, report)
    assert report.kept == 4 and dict(report.skipped) == {"chosen equals rejected": 1, "malformed": 1}
    # Only the reply (and its end token) is scored, never the prompt.
    chosen, _ = pairs[0]
    context = render_chat(tok, [{"role": "user", "content": PAIRS[0]["prompt"]}], add_generation_prompt=True).ids
    scored = [t for t in chosen.labels if t != -100]
    assert chosen.labels[:len(context) - 1] == [-100] * (len(context) - 1)
    assert tok.decode(scored) == PAIRS[0]["chosen"] + "<|assistant_end|>"
    start = evaluate_margins(model, model, pairs, 0.1, tok.eot_id, torch.device("cpu"))
    assert start["reward_margin"] == 0.0

    run = finetune_config(ckpt, DPO_DEFAULTS, ["train.lr=2e-3", "train.max_steps=30", "train.batch_size=4",
                                               "train.warmup_steps=0", "train.log_every=10", "train.device=cpu"],
                          tmp_path / "run")
    summary = dpo(ckpt, Source(str(data)), run, beta=0.1, show_progress=False)
    assert summary["train_set"]["reward_margin"] > 0.5
    assert summary["train_set"]["reward_accuracy"] == 1.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_accuracy", "loss"} <= set(logged[-1])
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_preference_pairs_from_executed_tests():
    model, tok = load_model(tiny_checkpoint())
    # Whatever the (random) model writes becomes a string; the test passes on even lengths only,
    # so some samples pass and some fail, and every pair is judged by really running it.
    problem = {"prompt": 'x = r"""', "test": '"""\nassert len(x) % 2 == 0', "task_id": "parity"}
    pairs = list(preference_pairs_from_tests(model, tok, [problem], samples=8, max_new_tokens=6, temperature=1.0))
    assert pairs, "expected at least one passing and one failing sample"
    for p in pairs:
        assert len("\n" + p["chosen"] + "\n\n") % 2 == 0  # x as the program builds it
        assert p["chosen"] != p["rejected"] and p["source"] == "parity"


def _dpo_rank(rank, world, port, ckpt, data, run):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from codefoundry.train.distributed import shutdown

    dpo(ckpt, Source(str(data)), run, beta=0.1, show_progress=False)
    shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dpo_on_two_ranks_matches_one_process(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    ckpt = make_checkpoint(tmp_path / "base", seed=1)

    def run(out, batch):
        return finetune_config(ckpt, DPO_DEFAULTS, ["train.lr=2e-3", "train.max_steps=4", f"train.batch_size={batch}",
                                                    "train.warmup_steps=0", "train.log_every=1", "train.device=cpu"],
                               out)
    dpo(ckpt, Source(str(data)), run(tmp_path / "one", 4), beta=0.1, show_progress=False)
    mp.start_processes(_dpo_rank, args=(2, _free_port(), ckpt, data, run(tmp_path / "two", 2)), nprocs=2,
                       start_method="spawn")
    one, two = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert len(two) == 4
    for key in ("loss", "reward_margin", "reward_accuracy"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=2e-4, abs=1e-6), key
