"""SFT: formats and mixing, packing without cross-talk, loss goes down, template is followed."""

from __future__ import annotations

import json
import os
import socket
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers_post import make_checkpoint

from codefoundry.checkpoint import load_model
from codefoundry.cli import main
from codefoundry.infer.engine import Request, SamplingParams, run_batch
from codefoundry.post.finetune import finetune_config
from codefoundry.post.sft import SFT_DEFAULTS, sft
from codefoundry.post.sft_data import (
    Example,
    Mixture,
    Source,
    pack_batches,
    render_examples,
)
from codefoundry.tokenizer import special as sp
from codefoundry.tokenizer.chat import render_chat
from codefoundry.train.metrics import read_metrics

PAIRS = [("add two numbers", "def add(a, b):\n    return a + b"),
         ("reverse a list", "def rev(xs):\n    return xs[::-1]"),
         ("square a number", "def sq(x):\n    return x * x"),
         ("is it even", "def even(n):\n    return n % 2 == 0")]


def write_data(tmp_path):
    """The same kind of pairs in all three formats, plus a bad line and an unusable record."""
    openai = tmp_path / "openai.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in PAIRS[:2]]
    openai.write_text("\n".join(lines + ["{broken json", json.dumps({"text": "no chat here"})]) + "\n")
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": PAIRS[2][0], "input": "", "output": PAIRS[2][1]}) + "\n")
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": PAIRS[3][0]},
                                                      {"from": "gpt", "value": PAIRS[3][1]}]}) + "\n")
    return [Source.parse(f"{openai}@2"), Source.parse(str(alpaca)), Source.parse(f"{sharegpt}@1")]


def test_packing_has_no_cross_talk(tmp_path):
    model, tok = load_model(make_checkpoint(tmp_path / "ckpt"))
    model.cfg.doc_mask, model.cfg.doc_sep_id = True, tok.eot_id
    examples = render_examples([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                for q, a in PAIRS], tok, 128)
    x, y = next(pack_batches(iter(examples), 1, 128, tok.eot_id))
    assert (y != -100).sum() == sum(sum(t != -100 for t in e.labels) for e in examples)
    with torch.no_grad():
        packed = F.cross_entropy(model(x)[0], y[0], ignore_index=-100, reduction="sum")
        alone = sum(F.cross_entropy(model(torch.tensor([e.inputs]))[0], torch.tensor(e.labels), ignore_index=-100,
                                    reduction="sum") for e in examples)
    assert torch.allclose(packed, alone, rtol=1e-4)


def test_mixture_follows_weights():
    a, b = [Example([1], [1])], [Example([2], [2])]
    draws = Counter(ex.inputs[0] for ex, _ in zip(Mixture([a, b], [3.0, 1.0], seed=0), range(4000)))
    assert abs(draws[1] / 4000 - 0.75) < 0.03


def test_sft_lowers_loss_and_follows_template(tmp_path):
    ckpt = make_checkpoint(tmp_path / "base")
    run = finetune_config(ckpt, SFT_DEFAULTS, ["train.lr=3e-3", "train.max_steps=80", "train.batch_size=4",
                                               "train.seq_len=128", "train.warmup_steps=5", "train.log_every=20",
                                               "train.device=cpu"], tmp_path / "run")
    summary = sft(ckpt, write_data(tmp_path), run, show_progress=False)
    assert summary["final"]["loss"] < 0.25 * summary["first"]["loss"]
    openai = summary["data"][str(tmp_path / "openai.jsonl")]
    assert openai["kept"] == 2 and openai["skipped"] == {"malformed": 2}
    model, tok = load_model(summary["checkpoint"])
    assert model.cfg.doc_mask is False  # a training-time switch, not saved into the checkpoint
    s = tok.special_ids
    for q, a in PAIRS:
        prompt = render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True).ids
        req = Request(prompt, SamplingParams(max_tokens=40, stop_ids={s[sp.ASSISTANT_END], tok.eot_id}))
        run_batch(model, tok, [req])
        assert req.finish_token == s[sp.ASSISTANT_END] and req.text == a


def _sft_rank(rank, world, port, ckpt, sources, run):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from codefoundry.train.distributed import shutdown

    sft(ckpt, sources, run, show_progress=False)
    shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sft_run(ckpt, out, batch, parallel="ddp", steps=4):
    return finetune_config(ckpt, SFT_DEFAULTS, [f"train.max_steps={steps}", f"train.batch_size={batch}",
                                                "train.seq_len=64", "train.warmup_steps=1", "train.log_every=1",
                                                "train.lr=3e-3", "train.device=cpu", f"train.parallel={parallel}"],
                           out)


def _logged(out, key="loss"):
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if key in r]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sft_on_two_ranks_matches_one_process(tmp_path, parallel):
    """Every assistant token weighs the same across ranks: 2 x 2 rows give the 4-row losses (masked
    targets differ per rank, so a per-rank mean would not)."""
    ckpt = make_checkpoint(tmp_path / "base")
    sources = write_data(tmp_path)
    sft(ckpt, sources, _sft_run(ckpt, tmp_path / "one", 4), show_progress=False)
    mp.start_processes(_sft_rank, args=(2, _free_port(), ckpt, sources, _sft_run(ckpt, tmp_path / "two", 2, parallel)),
                       nprocs=2, start_method="spawn")
    assert _logged(tmp_path / "two") == pytest.approx(_logged(tmp_path / "one"), rel=2e-4)
    assert len(_logged(tmp_path / "two")) == 4


def test_killed_sft_resumes_with_the_same_curve(tmp_path):
    ckpt = make_checkpoint(tmp_path / "base", dropout=0.1)  # dropout: the RNG state is part of the resume
    data = write_data(tmp_path)
    args = ["--checkpoint", str(ckpt), *[a for s in data for a in ("--data", f"{s.location}@{s.weight}")],
            "train.max_steps=8", "train.batch_size=2", "train.seq_len=64", "train.log_every=1", "train.warmup_steps=2",
            "train.device=cpu", "train.save_every=3"]
    assert main(["sft", "--out", str(tmp_path / "straight"), *args]) == 0
    assert main(["sft", "--out", str(tmp_path / "split"), "--stop-after", "5", *args]) == 0
    assert len(_logged(tmp_path / "split")) == 5
    assert main(["sft", "--out", str(tmp_path / "split"), "--resume", *args]) == 0
    assert _logged(tmp_path / "split") == _logged(tmp_path / "straight")  # bit-identical, step for step
    assert len(_logged(tmp_path / "straight")) == 8
