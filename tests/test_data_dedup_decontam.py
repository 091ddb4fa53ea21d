"""Exact + near dedup on planted duplicates, and decontamination on planted benchmark solutions."""

import gzip
import json
import re

import numpy as np
import pytest

from codefoundry.data.decontam import Decontaminator, find_benchmark_files
from codefoundry.data.dedup import code_shingles, identifier_hashes, lsh_bands, minhash_signature
from codefoundry.data.prepare import prepare
from codefoundry.data.shards import Shard
from codefoundry.data.sources import stdlib_root

BASE = (stdlib_root() / "json" / "decoder.py").read_text()
OTHERS = [stdlib_root() / "json" / "encoder.py", stdlib_root() / "json" / "scanner.py",
          stdlib_root() / "json" / "tool.py", stdlib_root() / "textwrap.py"]


def _jaccard(a: str, b: str) -> float:
    x, y = set(code_shingles(a, 5).tolist()), set(code_shingles(b, 5).tolist())
    return len(x & y) / len(x | y)


def near_duplicates(text: str) -> dict[str, str]:
    lines = text.splitlines(keepends=True)
    edited = lines.copy()
    for i in range(40, len(lines), 60):  # a few edited lines
        edited[i] = "    # edited: " + lines[i].strip() + " changed\n"
    return {
        "renamed.py": re.sub(r"\bmemo\b", "cache", re.sub(r"\bnextchar\b", "next_char", text)),
        "reformatted.py": "\n".join("\t" + ln.replace(" = ", "=") + "  " for ln in text.splitlines()) + "\n\n\n",
        "edited.py": "".join(edited),
    }


def _kept_texts(out, tok) -> list[str]:
    texts = []
    for split in ("train", "val"):
        shard = Shard(out / split)
        texts += [tok.decode(shard.document(i)[1:].tolist()) for i in range(len(shard))]
    return texts


def test_shingles_see_through_formatting_and_bands_fit_the_threshold():
    variants = near_duplicates(BASE)
    assert _jaccard(BASE, variants["reformatted.py"]) == 1.0  # identifier tokens ignore whitespace/punctuation
    assert _jaccard(BASE, variants["renamed.py"]) > 0.7 and _jaccard(BASE, variants["edited.py"]) > 0.7
    assert _jaccard(BASE, OTHERS[0].read_text()) < 0.2
    b, r = lsh_bands(0.7, 256)
    assert b * r <= 256 and abs((1 / b) ** (1 / r) - 0.7) < 0.06  # the LSH S-curve's midpoint sits at 0.7


def test_lsh_bands_match_datasketch_optimiser():
    datasketch = pytest.importorskip("datasketch")
    for threshold, num_perm in [(0.5, 256), (0.7, 256), (0.8, 128), (0.9, 64)]:
        lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert lsh_bands(threshold, num_perm) == (lsh.b, lsh.r)


def test_identifier_hashes_are_position_free_token_hashes():
    text = "def f(x1, _y):\n    return x1 + 2 * _y  # 3abc 0x1f café\n\tdef x1"
    tokens = re.findall(rb"(?<![A-Za-z0-9_\x80-\xff])[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*", text.encode())
    assert tokens[:6] == [b"def", b"f", b"x1", b"_y", b"return", b"x1"] and b"abc" not in tokens
    expected = [sum(byte * pow(0x01000193, k + 1, 2**32) for k, byte in enumerate(t)) % 2**32 for t in tokens]
    assert identifier_hashes(text).tolist() == expected  # so a token hashes the same wherever it stands
    assert identifier_hashes("").tolist() == [] and identifier_hashes("123 + 4.5").tolist() == []


def test_minhash_signature_estimates_jaccard():
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 2**32, 256, dtype=np.uint64) | 1).astype(np.uint32)
    errors = []
    for _ in range(40):
        pool = rng.integers(0, 2**63, 6000, dtype=np.uint64)
        n, shared = int(rng.integers(200, 3000)), rng.uniform(0.2, 1.0)
        k = int(n * shared)
        x, y = pool[:n], np.concatenate([pool[:k], pool[n:2 * n - k]])
        truth = k / (2 * n - k)
        estimate = (minhash_signature(x, a) == minhash_signature(y, a)).mean()
        errors.append(estimate - truth)
    assert abs(np.mean(errors)) < 0.015 and np.std(errors) < 0.04  # theory: s.d. <= 0.031 at 256 permutations
    x = pool[:500]
    assert np.array_equal(minhash_signature(np.concatenate([x, x[::-1]]), a), minhash_signature(x, a))


def test_exact_and_near_dedup_keep_one_per_cluster(tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    src = tmp_path / "src"
    src.mkdir()
    (src / "original.py").write_text(BASE)
    (src / "copy_a.py").write_text(BASE)
    (src / "copy_b.py").write_text(BASE)
    for name, text in near_duplicates(BASE).items():
        (src / name).write_text(text)
    for p in OTHERS:
        (src / p.name).write_text(p.read_text())
    out = tmp_path / "out"
    result = prepare([src], tok, out, 0.0, show_progress=False, fim_rate=0, filters=False, decontaminate=False,
                     workers=1, tasks=2)
    kept = _kept_texts(out, tok)
    family = [BASE, *near_duplicates(BASE).values()]
    assert sum(t in family for t in kept) == 1  # one of 3 byte copies + 3 near copies
    assert all(p.read_text() in kept for p in OTHERS)  # distinct files survive
    removed = result["train"]["removed"]
    assert removed["exact_dedup"]["exact_dedup"]["documents"] == 2
    assert removed["near_dedup"]["near_dedup"]["documents"] == 3
    assert removed["near_dedup"]["near_dedup"]["bytes"] > 3 * 0.9 * len(BASE)


def test_decontamination_removes_planted_benchmarks_and_keeps_clean_files(tiny_tokenizer, shared_data, tmp_path):
    tok, _ = tiny_tokenizer
    with gzip.open(shared_data / "HumanEval.jsonl.gz", "rt") as f:
        he = [json.loads(line) for line in f]
    mbpp = [json.loads(line) for line in (shared_data / "mbpp.jsonl").open()]
    src = tmp_path / "src"
    src.mkdir()
    # a full HumanEval function inside an otherwise normal module
    (src / "he_full.py").write_text("import os\n\n" + he[0]["prompt"] + he[0]["canonical_solution"] + "\n\nX = 1\n")
    # only the docstring, re-indented and re-wrapped
    doc = he[2]["prompt"].split('"""')[1]
    (src / "he_doc.py").write_text("def mine():\n        '''" + "  \n  ".join(doc.split("\n")) + "'''\n")
    # an MBPP reference solution with LF endings and different indentation
    code = mbpp[20]["code"].replace("\r\n", "\n").replace("\t", "    ")
    (src / "mbpp_sol.py").write_text("# solution\n" + "\n".join("  " + ln for ln in code.splitlines()) + "\n")
    clean = (stdlib_root() / "json" / "encoder.py").read_text()
    (src / "clean.py").write_text(clean)
    out = tmp_path / "out"
    result = prepare([src], tok, out, 0.0, show_progress=False, fim_rate=0, filters=False, exact_dedup=False,
                     near_dedup=False, benchmarks=str(shared_data), workers=1)
    assert _kept_texts(out, tok) == [clean]
    removed = result["train"]["removed"]["decontamination"]
    assert removed["contains_humaneval"]["documents"] == 2 and removed["contains_mbpp"]["documents"] == 1


def test_decontaminator_ignores_short_needles_and_defaults_to_the_package(shared_data):
    files = find_benchmark_files(shared_data)
    d = Decontaminator.from_files(files)
    assert d.too_short > 0 and d.find("def f(string):\n    return len(string)\n") is None
    default = find_benchmark_files(None)
    assert set(default) <= {"humaneval"}
    assert np.all([len(n.text) >= 40 for n in d.needles])
