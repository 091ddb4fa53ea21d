"""Training straight from sources: packing, FIM, filters, bad input, hub layouts, exact resume."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers_post import tiny_tokenizer

from codefoundry.data.sources import split_of, stdlib_root
from codefoundry.data.stream import StreamLoader, list_stream_files
from codefoundry.errors import UserError

JSON_PKG = stdlib_root() / "json"  # 5 files, ~40 KB: several epochs of tiny rows


def loader(sources=(JSON_PKG,), batch=4, seq=32, workers=0, **kw) -> StreamLoader:
    kw.setdefault("decontaminate", False)
    return StreamLoader([str(s) for s in sources], tiny_tokenizer(), batch, seq, seed=3, workers=workers, **kw)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_rows_are_the_packed_document_stream():
    tok = tiny_tokenizer()
    s = loader(fim_rate=0.0, filters=False, seq=64)
    batches = [s.next_batch() for _ in range(3)]
    x, y = batches[0]
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    stream = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()
    files = s.unit_files[0]
    order = np.random.default_rng([3, 0, 0]).permutation(len(files))
    expected = np.concatenate([[tok.eot_id] + tok.encode(Path(files[i].location).read_text()) for i in order])
    assert np.array_equal(stream, expected[:len(stream)])


def test_fim_and_filters_run_in_the_loader():
    tok = tiny_tokenizer()
    s = loader(fim_rate=1.0, seq=64)
    x, _ = s.next_batch()
    starts = (x.reshape(-1) == tok.eot_id).nonzero().flatten()
    assert len(starts) and all(x.reshape(-1)[i + 1] == tok.fim_prefix_id for i in starts if i + 1 < x.numel())
    strict = loader(quality_threshold=0.95)  # json/: three files score 0.91-0.92, two 0.98
    while strict.stats()["documents"] < 5:  # counts arrive with the batches: read one pass
        strict.next_batch()
    st = strict.stats()
    assert set(st["dropped"]) == {"quality"} and st["dropped"]["quality"] >= 3 and st["kept"] >= 1
    assert st["documents"] == st["kept"] + st["dropped"]["quality"]
    with pytest.raises(UserError, match="gave no tokens.*'quality': 5"):
        loader(quality_threshold=0.99).next_batch()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_identical_batches(workers):
    run = loader(workers=workers, batch=16, seq=64)
    first = [run.next_batch() for _ in range(7)]
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON / torch.save round trip
    rest = [run.next_batch() for _ in range(40)]  # crosses epoch boundaries of the small source
    assert run.epoch >= 1
    resumed = loader(workers=workers, batch=16, seq=64)
    resumed.load_state_dict(state)
    assert same(rest, [resumed.next_batch() for _ in range(40)])
    assert resumed.stats()["tokens"] >= run.stats()["tokens"] * 0.5
    fresh = loader(workers=workers, batch=16, seq=64)
    assert same(first, [fresh.next_batch() for _ in range(7)])  # and the start is deterministic


def test_curriculum_rows_hold_the_same_tokens():
    a, b = loader(), loader()
    x, y = a.next_batch()
    xs, ys = b.next_batch(seq_len=8)
    assert xs.shape == (16, 8) and torch.equal(xs.reshape(4, 32), x) and torch.equal(ys.reshape(4, 32), y)
    with pytest.raises(UserError, match="must divide"):
        b.next_batch(seq_len=5)


def test_validation_documents_are_never_trained_on(tmp_path):
    for i in range(8):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 30)
    s = loader([tmp_path], val_fraction=0.5, fim_rate=0.0, filters=False)
    text = ""
    while s.stats()["documents"] < 16:  # two passes over the folder
        text += tiny_tokenizer().decode(s.next_batch()[0].reshape(-1).tolist())
    seen = {i for i in range(8) if f"def f{i}(" in text}
    held = {i for i in range(8) if split_of(f"m{i}.py", 0.5) == "val"}
    assert held and seen and not held & seen
    assert s.stats()["dropped"]["held_out_val"] >= len(held)


def test_bad_inputs_are_named_and_counted(bad_files, tmp_path):
    s = loader([bad_files], fim_rate=0.0, filters=False, seq=16, batch=1)
    while s.stats()["files"] < 5:  # one pass over the 4 files
        s.next_batch()
    skipped = s.stats()["skipped"]
    assert {"non_utf8", "empty", "binary"} <= set(skipped)
    # a hub-style parquet file without any text column: counted with its rows, never trained on
    pq.write_table(pa.table({"question": ["q"] * 3, "answer": ["a"] * 3}), tmp_path / "wrong.parquet")
    only_bad = loader([tmp_path / "wrong.parquet"], seq=16, batch=1)
    with pytest.raises(UserError, match="no_text_column"):
        only_bad.next_batch()
    # a compressed JSONL file that ends early keeps the rows before the damage and says so
    rows = "".join(json.dumps({"content": f"def g{i}():\n    return {i}\n" * 20, "path": f"g{i}.py"}) + "\n"
                   for i in range(20))
    blob = gzip.compress(rows.encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    cut = loader([tmp_path / "cut.jsonl.gz"], seq=16, batch=1, filters=False)
    cut.next_batch()
    assert cut.stats()["skipped"].get("truncated_or_corrupt_file") == 1 and cut.stats()["kept"] >= 1


def write_hub_layouts(root):
    """Local stand-ins for hub corpora, with the hubs' own file layout and columns."""
    code = [f"def h{i}(a, b):\n    '''Add.'''\n    return a + b * {i}\n" * 8 for i in range(12)]
    star = root / "starcoderdata" / "python"
    star.mkdir(parents=True)
    pq.write_table(pa.table({"max_stars_repo_path": [f"src/h{i}.py" for i in range(12)],
                             "max_stars_repo_name": ["o/r"] * 12, "max_stars_count": [1] * 12,
                             "id": [str(i) for i in range(12)], "content": code}),
                   star / "train-00000-of-00001.parquet")
    parrot = root / "codeparrot-clean"
    parrot.mkdir()
    for f in range(2):
        lines = [json.dumps({"repo_name": "o/r", "path": f"p{f}_{i}.py", "copies": "1", "size": str(len(c)),
                             "content": c, "license": "mit", "hash": i, "line_mean": 20.0, "line_max": 40,
                             "alpha_frac": 0.6, "autogenerated": False}) for i, c in enumerate(code)]
        (parrot / f"file-00000000000{f + 1}.json.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    return {"hub:starcoderdata": str(star.parent), "hub:codeparrot-clean": str(parrot)}


def test_hub_corpora_stream_in_their_own_layout(tmp_path):
    roots = write_hub_layouts(tmp_path)
    files, _ = list_stream_files(["hub:starcoderdata", "hub:codeparrot-clean"], {"python"}, roots)
    assert [(f.source, f.kind, f.relpath) for f in files] == [
        ("starcoderdata", "parquet", "python/train-00000-of-00001.parquet"),
        ("codeparrot-clean", "jsonl", "file-000000000001.json.gz"),
        ("codeparrot-clean", "jsonl", "file-000000000002.json.gz")]
    s = StreamLoader(["hub:starcoderdata", "hub:codeparrot-clean"], tiny_tokenizer(), 2, 32, workers=0,
                     hub_root=roots, languages=("python",), decontaminate=False, filters=False)
    while s.stats()["documents"] < 36:  # one pass: 12 parquet rows + 2 x 12 JSONL rows
        s.next_batch()
    st = s.stats()
    assert st["kept"] == 36 and not st["skipped"] and not st["dropped"]


def test_units_split_files_across_ranks_and_workers():
    ranks = [StreamLoader([str(JSON_PKG)], tiny_tokenizer(), 2, 16, rank=r, world_size=2, workers=2,
                          decontaminate=False) for r in range(2)]
    owned = [{f.location for unit in r.unit_files for f in unit} for r in ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    with pytest.raises(UserError, match="fewer than the 12 loader units"):
        StreamLoader([str(JSON_PKG)], tiny_tokenizer(), 2, 16, world_size=2, workers=6)
    with pytest.raises(UserError, match="same settings"):
        loader(workers=2).load_state_dict(loader(workers=0).state_dict())
