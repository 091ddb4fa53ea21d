"""Pretraining straight from a stream of sources: no prepare step, exact resume."""

from __future__ import annotations

import shutil

import pytest

from codefoundry.data.sources import stdlib_root
from codefoundry.errors import UserError
from codefoundry.recipes import build_run_config
from codefoundry.train.metrics import read_metrics
from codefoundry.train.trainer import pretrain


def _run(data, out, steps=8, **over):
    overrides = [f"train.data={data}", f"train.out={out}", f"train.max_steps={steps}", "train.seq_len=32",
                 "train.batch_size=4", "train.log_every=1", "train.warmup_steps=2", "model.dropout=0.1",
                 "data.stream=true", f"data.sources={stdlib_root() / 'json'}", "data.stream_workers=0",
                 "data.decontaminate=false", "data.quality_threshold=0", "data.fim_rate=0.5"]
    return build_run_config("tiny", None, overrides + [f"{k}={v}" for k, v in over.items()])


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture()
def tok_dir(tiny_tokenizer, tmp_path):
    """A data directory holding only the tokenizer: no train shard, no val shard."""
    d = tmp_path / "tok_only"
    d.mkdir()
    shutil.copy(tiny_tokenizer[1], d / "tokenizer.json")
    return d


def test_stream_trains_and_resumes_exactly(tok_dir, tiny_tokenizer, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = pretrain(_run(tok_dir, straight), show_progress=False)
    assert summary["finished"] and len(_losses(straight)) == 8
    run = _run(tok_dir, split)
    assert not pretrain(run, stop_after=3, show_progress=False)["finished"]
    pretrain(run, resume=True, show_progress=False)
    assert _losses(split) == _losses(straight)  # the stream position was saved and continued


def test_stream_needs_a_tokenizer_and_sources(tmp_path, tok_dir):
    with pytest.raises(UserError, match="tokenizer"):
        pretrain(_run(tmp_path / "nothing", tmp_path / "o1"), show_progress=False)
    with pytest.raises(UserError, match="data.sources"):
        pretrain(_run(tok_dir, tmp_path / "o2", **{"data.sources": "[]"}), show_progress=False)
