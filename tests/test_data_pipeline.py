"""Readers, FIM, mixing, budget, per-domain validation and kill-and-resume of `data prepare`."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from codefoundry.data import packing
from codefoundry.data.fim import fim_split, fim_tokens, reassemble
from codefoundry.data.prepare import prepare
from codefoundry.data.shards import Shard
from codefoundry.data.sources import stdlib_root

FAST = {"show_progress": False, "filters": False, "exact_dedup": False, "near_dedup": False, "decontaminate": False}


def test_fim_rows_reassemble_to_the_document(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    text = (stdlib_root() / "json" / "tool.py").read_text()
    modes = set()
    for seed in range(12):
        cut = fim_split(text, 1.0, seed, "tool.py")
        modes.add(cut.mode)
        ids = fim_tokens(tok, cut, (tok.encode(cut.prefix), tok.encode(cut.middle), tok.encode(cut.suffix)))
        assert ids[0] == tok.fim_prefix_id and tok.fim_middle_id in ids
        assert reassemble(tok, ids) == text
    assert modes == {"psm", "spm"}
    assert fim_split(text, 0.5, 3, "a") == fim_split(text, 0.5, 3, "a")  # deterministic per (seed, doc)
    assert sum(fim_split(text, 0.5, 0, f"doc{i}") is not None for i in range(400)) in range(160, 241)
    assert fim_split(text, 0.0, 0, "x") is None


def _docs(shard, tok):
    return [tok.decode(shard.document(i)[1:].tolist()) for i in range(len(shard))]


def test_prepare_applies_fim_to_train_only_and_keeps_original_bytes(tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    src = stdlib_root() / "json"
    res = prepare([src], tok, tmp_path / "o", 0.4, fim_rate=1.0, workers=1, **FAST)
    train, val = Shard(tmp_path / "o" / "train"), Shard(tmp_path / "o" / "val")
    assert len(train) and len(val)
    fim_ids = {tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id}
    assert all(tok.fim_prefix_id == train.document(i)[1] for i in range(len(train)))
    assert not fim_ids & set(np.unique(val.tokens).tolist())
    originals = {p.read_text() for p in src.glob("*.py")}
    assert {reassemble(tok, train.document(i)[1:].tolist()) for i in range(len(train))} <= originals
    assert set(_docs(val, tok)) <= originals
    total = sum(len(t.encode()) for t in originals)
    assert res["train"]["bytes"] + res["val"]["bytes"] == total == train.meta["bytes"] + val.meta["bytes"]
    assert sum(res["train"]["fim_rows"].values()) == res["train"]["documents"]


def _write_inputs(tmp_path):
    """The Stack-like JSONL.gz, StarCoderData-like JSONL.zst and CodeParrot-like Parquet, with bad rows."""
    code = [(stdlib_root() / "json" / n).read_text() for n in ("decoder.py", "encoder.py", "tool.py")]
    d = tmp_path / "inputs"
    d.mkdir()
    lines = [json.dumps({"content": code[0], "lang": "Python", "path": "a/decoder.py", "repo_name": "r1"}),
             "{not json",
             json.dumps({"size": 3, "path": "x.py"}),  # no text column
             json.dumps({"content": "function f() { return 1; }\n" * 5, "lang": "JavaScript", "path": "f.js"})]
    with gzip.open(d / "stack.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    zdata = json.dumps({"content": code[1], "max_stars_repo_path": "pkg/encoder.py", "max_stars_repo_name": "r2"})
    (d / "starcoder.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((zdata + "\n").encode()))
    pq.write_table(pa.table({"code": [code[2]], "language": ["Python"], "path": ["tool.py"], "repo_name": ["r3"]}),
                   d / "parrot.parquet")
    (d / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    return d, code


def test_readers_handle_stack_layouts_and_count_bad_input(tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    d, code = _write_inputs(tmp_path)
    sources = [d / "stack.jsonl.gz", d / "starcoder.jsonl.zst", d / "parrot.parquet", d / "broken.parquet"]
    res = prepare(sources, tok, tmp_path / "o", 0.0, languages={"python"}, fim_rate=0, workers=1, **FAST)
    assert sorted(_docs(Shard(tmp_path / "o" / "train"), tok)) == sorted(code)
    skipped = res["train"]["skipped"]["counts"]
    assert skipped == {"corrupt_json": 1, "missing_text_column": 1, "corrupt_parquet": 1}
    assert res["train"]["removed"]["language"]["language_not_selected"]["documents"] == 1
    assert set(res["train"]["languages"]) == {"python"}


def test_weights_budget_and_per_domain_validation(tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    a, b = stdlib_root() / "json", stdlib_root() / "email" / "mime"
    base = prepare([a, b], tok, tmp_path / "base", 0.3, fim_rate=0, workers=1, **FAST)
    mixed = prepare([f"{a}=2", f"{b}=0"], tok, tmp_path / "mixed", 0.3, fim_rate=0, workers=1, val_by="source", **FAST)
    assert mixed["train"]["by_source"]["json"]["documents"] == 2 * base["train"]["by_source"]["json"]["documents"]
    assert "mime" in base["train"]["by_source"] and "mime" not in mixed["train"]["by_source"]
    assert mixed["val"]["documents"] == base["val"]["documents"]  # weights never touch the held-out set
    for name in base["val"]["by_source"]:
        assert Shard(tmp_path / "mixed" / "val_by_source" / name).meta["domain"] == ["source", name]
    budget = base["train"]["tokens"] // 2
    cut = prepare([a, b], tok, tmp_path / "cut", 0.3, fim_rate=0, workers=1, max_tokens=budget, **FAST)
    assert 0 < cut["train"]["tokens"] <= budget and cut["val"]["tokens"] == base["val"]["tokens"]


def test_killed_prepare_resumes_to_identical_shards(tiny_tokenizer, tmp_path, monkeypatch):
    tok, _ = tiny_tokenizer
    src = [stdlib_root() / "json", stdlib_root() / "email" / "mime"]
    opts = {"fim_rate": 0.5, "workers": 1, "tasks": 2, "show_progress": False, "decontaminate": False}
    prepare(src, tok, tmp_path / "straight", 0.2, **opts)

    original_run = packing.TokenizeToParts.run
    ranks_run = []

    def crash_on_rank_1(self, data, rank=0, world_size=1):
        ranks_run.append(rank)
        if rank == 1:
            raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-way
        return original_run(self, data, rank, world_size)

    monkeypatch.setattr(packing.TokenizeToParts, "run", crash_on_rank_1)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tok, tmp_path / "resumed", 0.2, **opts)
    assert ranks_run == [0, 1] and (tmp_path / "resumed" / ".work").is_dir()
    ranks_run.clear()
    monkeypatch.setattr(packing.TokenizeToParts, "run", lambda self, data, rank=0, world_size=1: (
        ranks_run.append(rank), original_run(self, data, rank, world_size))[1])
    prepare(src, tok, tmp_path / "resumed", 0.2, **opts)
    assert ranks_run == [1]  # the finished rank was not redone
    for split in ("train", "val"):
        for name in ("tokens.bin", "index.npy"):
            assert (tmp_path / "straight" / split / name).read_bytes() == (tmp_path / "resumed" / split / name).read_bytes()
    assert not (tmp_path / "resumed" / ".work").exists()


def test_a_prewritten_token_stream_becomes_the_shard_by_link_after_its_length_is_checked(tmp_path, monkeypatch):
    """The merge's parallel path: parts' tokens already concatenated by the copy stage are linked (copied
    where hard links fail), and a stream whose length does not match the parts is refused, never
    written as a shard."""
    from codefoundry.data.shards import ShardWriter
    from codefoundry.errors import UserError

    parts = []
    for r, docs in enumerate(([[1, 2, 3], [4]], [[5, 6]])):
        w = ShardWriter(tmp_path / "parts" / str(r), 512)
        for d in docs:
            w.add(d)
        w.close({})
        parts.append(Shard(tmp_path / "parts" / str(r)))
    stream = tmp_path / "stream.bin"
    stream.write_bytes(np.arange(1, 7, dtype=np.uint16).tobytes())
    w = ShardWriter(tmp_path / "out", 512, tokens_file=str(stream))
    for p in parts:
        w.add_shard(p)
    w.close({})
    out = Shard(tmp_path / "out")
    assert [out.document(i).tolist() for i in range(len(out))] == [[1, 2, 3], [4], [5, 6]]
    assert (tmp_path / "out" / "tokens.bin").stat().st_ino == stream.stat().st_ino
    monkeypatch.setattr("os.link", lambda *a: (_ for _ in ()).throw(PermissionError("no hard links here")))
    copied = ShardWriter(tmp_path / "copied", 512, tokens_file=str(stream))
    for p in parts:
        copied.add_shard(p)
    copied.close({})
    assert (tmp_path / "copied" / "tokens.bin").read_bytes() == stream.read_bytes()
    with pytest.raises(ValueError, match="written beforehand"):
        w.add([7])
    stream.write_bytes(stream.read_bytes()[:-2])  # one token short
    short = ShardWriter(tmp_path / "short", 512, tokens_file=str(stream))
    for p in parts:
        short.add_shard(p)
    with pytest.raises(UserError, match="run the same command again"):
        short.close({})
    assert not (tmp_path / "short" / "metadata.json").exists()
