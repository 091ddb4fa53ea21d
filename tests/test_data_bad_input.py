"""Bad input never stops `data prepare` or loses good documents (issue 18 item 12, issue 17).

Each case plants one hostile thing beside good code in a source folder; the run must finish,
keep every good document, and name the skipped thing in metadata.json.
"""

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codefoundry.data.prepare import prepare
from codefoundry.data.shards import Shard

FAST = {"show_progress": False, "filters": False, "exact_dedup": False, "near_dedup": False, "decontaminate": False,
        "fim_rate": 0.0, "workers": 1}
GOOD = "def add(a, b):\n    return a + b\n"


def _rows(n: int, tag: str) -> list[str]:
    return [json.dumps({"content": f"def {tag}_{i}(x):\n    return x * {i}\n", "lang": "Python",
                        "path": f"{tag}_{i}.py"}) for i in range(n)]


def truncated_gzip(d: Path) -> int:
    data = gzip.compress(("\n".join(_rows(400, "row")) + "\n").encode())
    (d / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])  # EOFError part-way through
    return 0  # rows before the damage are kept: at least one, checked below


def fifo(d: Path) -> int:
    os.mkfifo(d / "pipe.py")  # reading it would block forever
    return 0


@pytest.fixture(autouse=True)
def _remove_deep_folders(tmp_path):
    """pytest's own clean-up (shutil.rmtree) recurses once per level: remove the 1,200 levels here,
    bottom up, each relative to its parent's descriptor (full paths cost O(depth) per call)."""
    yield
    for top in (tmp_path / "src" / "n", tmp_path / "n"):
        if not top.is_dir():
            continue
        fds = [os.open(top, os.O_RDONLY)]
        while os.path.isdir(f"/proc/self/fd/{fds[-1]}/n"):
            fds.append(os.open("n", os.O_RDONLY, dir_fd=fds[-1]))
        for i in range(len(fds) - 1, -1, -1):
            for name in os.listdir(fds[i]):
                if name != "n":
                    os.unlink(name, dir_fd=fds[i])
            if i:
                os.rmdir("n", dir_fd=fds[i - 1])
            os.close(fds[i])
        os.rmdir(top)


def deep_folders(d: Path) -> int:
    fd = os.open(d, os.O_RDONLY)
    for _ in range(1200):  # one by one, relative to the parent: mkdir(parents=True) itself recurses too deep
        os.mkdir("n", dir_fd=fd)
        fd, parent = os.open("n", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    with open(os.open("deep.py", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "w") as f:
        f.write("def deep():\n    return 'bottom'\n")
    os.close(fd)
    return 1


def mixed_folder(d: Path) -> int:
    with gzip.open(d / "rows.jsonl.gz", "wt") as f:
        f.write("\n".join(_rows(3, "mixed")) + "\n")
    return 3


def symlink_outside(d: Path) -> int:
    outside = d.parent / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text("SECRET_OUTSIDE_THE_TREE = 1\n")
    (d / "leak.py").symlink_to(outside / "secret.py")
    return 0


def symlink_loop(d: Path) -> int:
    (d / "loop.py").symlink_to(d / "loop.py")
    (d / "again").symlink_to(d)  # a folder loop: never descended
    return 0


def odd_parquet(d: Path) -> int:
    """A text column beside columns of unexpected types, and a file with no text column at all."""
    pq.write_table(pa.table({"content": ["def pq_a():\n    return 1\n", "def pq_b():\n    return 2\n"],
                             "path": [17, 18], "lang": [["x"], ["y"]], "extra": [{"k": 1}, {"k": 2}]}),
                   d / "odd.parquet")
    pq.write_table(pa.table({"blob": [b"\x00", b"\x01"], "n": [1, 2]}), d / "notext.parquet")
    return 2


def huge_file(d: Path) -> int:
    with open(d / "huge.py", "wb") as f:
        f.truncate(200_000_000)  # 200 MB, sparse: must be skipped by size, never read
    return 0


def not_json_lines(d: Path) -> int:
    with gzip.open(d / "service-2.json.gz", "wt") as f:  # pretty-printed JSON, as botocore ships
        f.write(json.dumps({"version": "2.0", "operations": {f"Op{i}": {"name": i} for i in range(50)}}, indent=2))
    return 0


def invalid_utf8(d: Path) -> int:
    (d / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    with gzip.open(d / "bad.jsonl.gz", "wb") as f:
        f.write(b'{"content": "x = \'\xff\xfe\'", "path": "b.py"}\n' + (_rows(1, "ok")[0] + "\n").encode())
    return 1


CASES = {  # case -> (builder, reasons it must report)
    "truncated_gzip": (truncated_gzip, {"truncated_or_corrupt_file"}),
    "fifo": (fifo, {"not_regular_file"}),
    "deep_folders": (deep_folders, set()),
    "mixed_folder": (mixed_folder, set()),
    "symlink_outside": (symlink_outside, {"symlink_outside_source"}),
    "symlink_loop": (symlink_loop, {"symlink_loop"}),
    "odd_parquet": (odd_parquet, {"no_text_column"}),
    "huge_file": (huge_file, {"too_large"}),
    "invalid_utf8": (invalid_utf8, {"non_utf8", "corrupt_json"}),
    "not_json_lines": (not_json_lines, {"not_json_lines"}),
}


def _texts(out: Path, tok) -> list[str]:
    shard = Shard(out / "train")
    return [tok.decode(shard.document(i)[1:].tolist()) for i in range(len(shard))]


@pytest.mark.timeout(60)  # the FIFO hung forever before
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_skipped_and_counted_never_fatal(case, tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.py").write_text(GOOD)
    build, reasons = CASES[case]
    extra = build(src)
    res = prepare([src], tok, tmp_path / "out", 0.0, **FAST)
    texts = _texts(tmp_path / "out", tok)
    assert GOOD in texts  # the good file is never lost
    if case == "truncated_gzip":
        assert 1 <= len(texts) - 1 < 400  # the rows before the damage are kept
    else:
        assert len(texts) == 1 + extra
    assert not any("SECRET_OUTSIDE" in t for t in texts)
    skipped = res["train"]["skipped"]
    assert set(skipped["counts"]) == reasons
    meta = json.loads((tmp_path / "out" / "train" / "metadata.json").read_text())
    assert meta["skipped"] == skipped  # named in metadata.json, with examples
    assert all(skipped["examples"][r] for r in reasons)
    if case == "odd_parquet":
        assert skipped["counts"]["no_text_column"] == 2  # both rows of the file without text, counted
    if case == "not_json_lines":
        assert skipped["counts"]["not_json_lines"] == 1  # the file, once: not each of its 150 lines


def test_symlinks_outside_are_followed_only_when_asked(tiny_tokenizer, tmp_path):
    tok, _ = tiny_tokenizer
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.py").write_text(GOOD)
    symlink_outside(src)
    (src / "inside.py").symlink_to(src / "good.py")  # inside the tree: read (exact dedup would drop the copy)
    res = prepare([src], tok, tmp_path / "out", 0.0, follow_symlinks=True, **FAST)
    assert sorted(_texts(tmp_path / "out", tok)) == sorted([GOOD, GOOD, "SECRET_OUTSIDE_THE_TREE = 1\n"])
    assert res["train"]["skipped"]["counts"] == {}


def test_folder_walk_is_sorted_iterative_and_names_each_skip(tmp_path):
    from codefoundry.data.sources import scan_folder

    deep_folders(tmp_path)
    symlink_loop(tmp_path)
    (tmp_path / "b.py").write_text(GOOD)
    (tmp_path / "a.js").write_text("let a = 1;\n")
    (tmp_path / "notes.txt").write_text("ignored: not code")
    entries = list(scan_folder(tmp_path))
    assert [e.relpath for e in entries] == ["a.js", "b.py", "loop.py", "/".join(["n"] * 1200) + "/deep.py"]
    assert [e.skip for e in entries] == [None, None, "symlink_loop", None]
    assert [e.language for e in entries] == ["javascript", "python", "python", "python"]


def test_folder_walk_names_files_under_a_followed_folder_link_by_the_link(tmp_path):
    """Paths under the root (ids, the train/val split) go through a followed folder link, as written."""
    from codefoundry.data.sources import scan_folder

    outside = tmp_path / "outside" / "pkg"
    outside.mkdir(parents=True)
    (outside / "mod.py").write_text(GOOD)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.py").write_text(GOOD)
    (src / "sub" / "linked").symlink_to(outside)
    followed = [(e.relpath, e.skip) for e in scan_folder(src, follow_symlinks=True)]
    assert followed == [("sub/a.py", None), ("sub/linked/mod.py", None)]
    assert [(e.relpath, e.skip) for e in scan_folder(src)] == [("sub/a.py", None),
                                                              ("sub/linked", "symlink_outside_source")]
