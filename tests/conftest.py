"""Shared fixtures: a small real-code corpus, a tiny tokenizer, prepared shards, a tiny checkpoint.

Also the suite's CPU settings: two torch threads at most, and OpenMP threads that sleep when idle.
libgomp's default makes an idle OpenMP worker spin for a while before it sleeps; on a 2-core machine
shared with other processes a spinning worker takes the core the working thread needs, and a model
test then spends most of its CPU time in libgomp's spin loop (``perf``: ~72% of samples). Tests of
many small ops suffer most: the speculative-decoding test took 0.8-14 s spinning and 0.15-0.2 s
passive, the strided-bpb test 15-57 s and 2.3-6 s. libgomp reads the policy once, when torch loads
it, so it is set here before torch is imported (subprocesses, e.g. DDP ranks, inherit it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp (see above)

from pathlib import Path

import pytest
import torch

from codefoundry.data.prepare import prepare
from codefoundry.data.sources import stdlib_root
from codefoundry.tokenizer import CodeTokenizer, train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_SOURCES = [stdlib_root() / "json", stdlib_root() / "logging", stdlib_root() / "email", stdlib_root() / "asyncio"]

THREADS = min(2, torch.get_num_threads())
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with the suite's thread count: a training run sets its own
    (``train.threads``, the machine's core count by default) and would otherwise keep it for the
    tests after it."""
    torch.set_num_threads(THREADS)
    yield


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
