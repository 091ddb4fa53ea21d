"""Shared fixtures: a small real-code corpus, a tiny tokenizer, prepared shards, a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codefoundry.data.prepare import prepare
from codefoundry.data.sources import stdlib_root
from codefoundry.tokenizer import CodeTokenizer, train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_SOURCES = [stdlib_root() / "json", stdlib_root() / "logging", stdlib_root() / "email", stdlib_root() / "asyncio"]

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> tuple[CodeTokenizer, Path]:
    from codefoundry.data.sources import iter_source_files, read_text

    texts = [t for sf in iter_source_files(TINY_SOURCES) if (t := read_text(sf.path)[0])]
    tok = train_tokenizer(texts, 512, show_progress=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return tok, path


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> Path:
    """A folder with one good file and one each of: non-UTF-8, empty, binary."""
    d = tmp_path_factory.mktemp("bad")
    (d / "good.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    (d / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (d / "empty.py").write_text("   \n")
    (d / "blob.py").write_bytes(b"\x00\x01\x02binary")
    return d


@pytest.fixture(scope="session")
def tiny_data(tiny_tokenizer, bad_files, tmp_path_factory) -> Path:
    tok, _ = tiny_tokenizer
    out = tmp_path_factory.mktemp("data")
    prepare([*TINY_SOURCES, bad_files], tok, out, val_fraction=0.15, show_progress=False)
    return out
