"""The reference-run speedrun: hub readers on local files in the hubs' own layouts, and the whole
orchestration (download -> tokenizer -> shards -> pretrain -> SFT -> pass@k -> agent -> report) at toy size."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from helpers_post import tiny_tokenizer
from test_stream import write_hub_layouts

from codefoundry.cli import main
from codefoundry.data import hub_corpus
from codefoundry.data.readers import SourceSpec, build_reader
from codefoundry.data.sources import iter_source_files, read_text
from codefoundry.errors import UserError
from codefoundry.post.sft_data import Skipped, Source, render_examples
from tests.conftest import TINY_SOURCES


def test_hub_corpus_download_is_capped_and_resumable(tmp_path):
    roots = write_hub_layouts(tmp_path / "hub")
    fs = LocalFileSystem()
    sizes = [s for _, s in hub_corpus.list_files("hub:codeparrot-clean", root=roots["hub:codeparrot-clean"], fs=fs)]
    assert len(sizes) == 2
    logs = []
    one = hub_corpus.download("hub:codeparrot-clean", tmp_path / "dl", max_gb=sizes[0] * 1.5 / 1e9,
                              root=roots["hub:codeparrot-clean"], fs=fs, log=logs.append)
    assert one["files"] == 1 and one["files_available"] == 2 and one["bytes"] == sizes[0]
    both = hub_corpus.download("hub:codeparrot-clean", tmp_path / "dl", root=roots["hub:codeparrot-clean"], fs=fs,
                               log=logs.append)
    assert both["files"] == 2 and "(1 already there)" in logs[-1]
    # the data stage's readers read the download in the corpus's column layout
    reader = build_reader(SourceSpec(str(tmp_path / "dl")), str(tmp_path / "ledger"), None)
    docs = list(reader.run())
    assert len(docs) == 24 and docs[0].metadata["path"] == "o/r/p0_0.py" and docs[0].metadata["language"] == "python"
    star = hub_corpus.list_files("hub:starcoderdata", ["python", "rust"], root=roots["hub:starcoderdata"], fs=fs)
    assert [p.rsplit("/", 2)[-2] for p, _ in star] == ["python"]
    with pytest.raises(UserError, match="unknown hub corpus"):
        hub_corpus.hub_corpus("hub:the-stack-v2")


def write_sft_layouts(root):
    """CodeAlpaca-20k, Code-Feedback and GSM8K rows with the hubs' own parquet columns."""
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"output": ["return a + b", "print('hi')"],
                             "instruction": ["Add two numbers.", "Print hi."], "input": ["def add(a, b):", ""]}),
                   root / "codealpaca.parquet")
    messages = [[{"role": "user", "content": "Reverse a list in Python."},
                 {"role": "assistant", "content": "Use `xs[::-1]`."}]] * 2
    pq.write_table(pa.table({"id": [1, 2], "messages": messages}), root / "code-feedback.parquet")
    pq.write_table(pa.table({"question": ["Tom has 3 apples and buys 4. How many?"],
                             "answer": ["He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"]}), root / "gsm8k.parquet")
    return {name: root / f"{name}.parquet" for name in ("codealpaca", "code-feedback", "gsm8k")}


def test_sft_hub_readers_read_the_real_column_layouts(tmp_path):
    files = write_sft_layouts(tmp_path)
    tok = tiny_tokenizer()
    for name, n in (("codealpaca", 2), ("code-feedback", 2), ("gsm8k", 1)):
        records = list(Source.parse(f"hub:{name}={files[name]}@0.5").records())
        assert len(render_examples(records, tok, 1024)) == n
    gsm = next(Source.parse(f"hub:gsm8k={files['gsm8k']}").records())["messages"]
    assert gsm[1]["content"] == "He has 3 + 4 = 7 apples.\nThe answer is 7."
    alpaca = next(Source.parse(f"hub:codealpaca={files['codealpaca']}").records())["messages"]
    assert alpaca[0]["content"] == "Add two numbers.\n\ndef add(a, b):" and alpaca[1]["content"] == "return a + b"
    # a file without the dataset's columns is counted with its rows; a dataset with none is an error
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(files["gsm8k"].read_bytes())
    pq.write_table(pa.table({"text": ["x", "y", "z"]}), folder / "b.parquet")
    records = list(Source.parse(f"hub:gsm8k={folder}").records())
    assert Skipped("gsm8k: missing columns question, answer", 3) in records
    from codefoundry.post.sft_data import LoadReport

    report = LoadReport()
    render_examples(records, tok, 1024, report)
    assert report.kept == 1 and report.skipped["gsm8k: missing columns question, answer"] == 3
    with pytest.raises(UserError, match="no parquet file with the columns question, answer.*text"):
        list(Source.parse(f"hub:gsm8k={folder / 'b.parquet'}").records())


def codeparrot_mirror(root):
    """A codeparrot-clean look-alike (JSONL.gz, its columns) holding real standard-library code."""
    texts = [(sf.relpath, t) for sf in iter_source_files(TINY_SOURCES[:2]) if (t := read_text(sf.path)[0])]
    root.mkdir(parents=True)
    for f in range(2):
        rows = [json.dumps({"repo_name": "py/stdlib", "path": path, "copies": "1", "size": str(len(text)),
                            "content": text, "license": "psf", "hash": str(i), "line_mean": 30.0, "line_max": 99,
                            "alpha_frac": 0.6, "autogenerated": False})
                for i, (path, text) in enumerate(texts) if i % 2 == f]
        (root / f"file-00000000000{f + 1}.json.gz").write_bytes(gzip.compress("\n".join(rows).encode()))
    return root


def test_recipe_speedrun_end_to_end(tmp_path, shared_data, capsys):
    mirror = codeparrot_mirror(tmp_path / "mirror")
    sft = write_sft_layouts(tmp_path / "sft")
    out = tmp_path / "run"
    argv = ["speedrun", "--recipe", "nanocode", "--preset", "nanocode-tiny", f"--out={out}",
            f"--hub-mirror=hub:codeparrot-clean={mirror}", "--max-gb=1", "--vocab-size=512",
            *[f"--sft-source=hub:{name}={path}" for name, path in sft.items()], "--sft-steps=2",
            "--tool-conversations=4", f"--bench-data={shared_data}", "--eval-limit=2", "--eval-n=2",
            "--eval-max-new-tokens=12", "--usd-per-gpu-hour=3",
            "train.max_steps=2", "train.seq_len=64", "train.batch_size=2", "train.grad_accum=1", "train.device=cpu",
            "train.dtype=fp32", "train.compile=off", "train.optimizer=adamw", "train.save_every=0",
            "train.eval_every=0", "train.warmup_steps=1", "train.log_every=1"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["prepare"]["downloads"][0]["files"] == 2 and results["prepare"]["vocab_size"] == 512
    assert results["pretrain"]["steps"] == 2 and results["preset"] == "nanocode-tiny"
    for label in ("base", "sft"):
        for bench in ("humaneval", "mbpp"):
            res = results["eval"][label][bench]
            assert res["tasks"] == 2 and 0 <= res["pass@1"] <= res["pass@2"] <= 1
    sft_data = results["sft"]["data"]
    rows = {src.split("=")[0].split("@")[0].rsplit("/", 1)[-1]: info["kept"] + sum(info["skipped"].values())
            for src, info in sft_data.items()}  # every row is trained on or counted (64-token rows skip long ones)
    assert rows == {"tool_use.jsonl": 4, "hub:codealpaca": 2, "hub:code-feedback": 2, "hub:gsm8k": 1}
    assert all(info["kept"] for src, info in sft_data.items() if "codealpaca" in src or "code-feedback" in src)
    assert results["agent"]["stop_reason"] in ("done", "step_limit", "context_full")
    assert results["agent"]["success"] is (results["agent"]["output"] == "Hello, world!")
    report = (out / "report.md").read_text()
    for figure in ("humaneval", "mbpp", "Agent demo", "device-hours", "CPU: no GPU cost", "pretrain_loss.png"):
        assert figure in report
    assert (out / "pretrain_loss.png").stat().st_size > 1000 and (out / "sft_loss.png").stat().st_size > 1000
    assert set(results["timings"]) == {"corpus", "tokenizer", "data", "pretrain", "sft", "eval", "agent"}


def test_other_ranks_wait_for_this_launchs_marker(tmp_path):
    import threading
    import time

    from codefoundry.speedrun_recipe import wait_for_marker

    marker = tmp_path / ".prepared.json"
    marker.write_text(json.dumps({"written_at": time.time() - 60, "prepared": "stale"}))  # an earlier run's
    started = time.time()
    threading.Timer(0.3, lambda: marker.write_text(json.dumps({"written_at": time.time(), "prepared": "new"}))).start()
    assert wait_for_marker(marker, started, poll_s=0.05)["prepared"] == "new"
