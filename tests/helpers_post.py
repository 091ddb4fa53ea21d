"""Shared by the post-training and inference tests: a tiny tokenizer and model checkpoint,
built once per test process (tokenizer trained on a few standard-library files)."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import torch

from codefoundry.checkpoint import save_checkpoint
from codefoundry.data.sources import stdlib_root
from codefoundry.model import Transformer
from codefoundry.presets import get_preset
from codefoundry.tokenizer import CodeTokenizer, train_tokenizer

CORPUS_FILES = ["textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py", "keyword.py"]


@functools.cache
def tiny_tokenizer_path() -> Path:
    texts = [(stdlib_root() / name).read_text() for name in CORPUS_FILES]
    tok = train_tokenizer(texts, 512, show_progress=False)
    path = Path(tempfile.mkdtemp(prefix="cf-tok-")) / "tokenizer.json"
    tok.save(path)
    return path


def tiny_tokenizer() -> CodeTokenizer:
    return CodeTokenizer.from_file(tiny_tokenizer_path())


def make_checkpoint(out: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised tiny model saved as a checkpoint directory."""
    cfg = get_preset("tiny")
    cfg.vocab_size = tiny_tokenizer().vocab_size
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return save_checkpoint(out, Transformer(cfg), tiny_tokenizer_path(), preset="tiny")


@functools.cache
def tiny_checkpoint() -> Path:
    return make_checkpoint(Path(tempfile.mkdtemp(prefix="cf-ckpt-")) / "checkpoint")


@contextlib.contextmanager
def tiny_server(limits, max_batch: int = 8):
    """The tiny checkpoint served over HTTP on loopback: yields (url, engine, model, tokenizer)."""
    from codefoundry.checkpoint import load_model
    from codefoundry.infer.engine import Engine
    from codefoundry.infer.server import BackgroundServer, make_app

    model, tok = load_model(tiny_checkpoint())
    with Engine(model, tok, max_batch=max_batch) as engine, \
            BackgroundServer(make_app(engine, tok, "tiny", limits), limits=limits) as url:
        yield url, engine, model, tok
