"""Tokens per second the stream loader delivers, per worker, and the workers that feeds a GPU.

    python bench/bench_stream.py [--source DIR] [--tokenizer tokenizer.json] [--seconds 20]
                                 [--workers 0,2] [--target 500000]

Reads the source through :class:`~codefoundry.data.stream.StreamLoader` exactly as training
would (readers, StarCoder2 + quality filters, decontamination, 50% FIM, tokenization, packing
into nanocode-124m rows: 2048 tokens, 32 per batch) and times ``next_batch`` only, after a first
batch that pays for start-up. ``workers=0`` runs everything in this process: that figure is one
worker's throughput, and ``target / it`` is the number of loader workers (cores) a GPU needs.
Without ``--tokenizer`` a 32,768-token BPE (nanocode's) is trained on the source first (not timed).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from codefoundry.data.sources import iter_source_files, read_text, stdlib_root
from codefoundry.data.stream import StreamLoader
from codefoundry.tokenizer import CodeTokenizer, train_tokenizer


def measure(source: str, tokenizer: CodeTokenizer, workers: int, seconds: float, batch: int, seq: int) -> dict:
    loader = StreamLoader([source], tokenizer, batch, seq, workers=workers)
    t0 = time.perf_counter()
    loader.next_batch()  # start-up: worker processes, filters, decontamination index
    startup = time.perf_counter() - t0
    t0, batches = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        loader.next_batch()
        batches += 1
    elapsed = time.perf_counter() - t0
    stats = loader.stats()
    return {"workers": workers, "tok_s": batches * batch * seq / elapsed, "startup_s": startup,
            "epochs": loader.epoch, "kept": stats["kept"], "dropped": sum(stats["dropped"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(stdlib_root()))
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train a 32K BPE on the source)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per setting")
    ap.add_argument("--workers", default="0,2", help="comma-separated worker counts (0 = in this process)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--target", type=float, default=500_000, help="tokens/s the trainer consumes (nanocode-124m, 1 H100)")
    args = ap.parse_args()

    if args.tokenizer:
        tok = CodeTokenizer.from_file(args.tokenizer)
    else:
        texts = [t for sf in iter_source_files([Path(args.source)]) if (t := read_text(sf.path)[0])]
        t0 = time.perf_counter()
        tok = train_tokenizer(texts, 32768, show_progress=False)
        print(f"tokenizer: 32,768-token BPE trained on {len(texts)} files in {time.perf_counter() - t0:.1f} s")
        tok.save(Path(tempfile.mkdtemp(prefix="cf-bench-")) / "tokenizer.json")
    print(f"source {args.source}; rows {args.batch_size} x {args.seq_len}; {os.cpu_count()} cores here")
    print(f"{'workers':>7} {'tokens/s':>10} {'per worker':>11} {'start-up s':>10}  passes  kept  dropped")
    per_worker = None
    for workers in (int(w) for w in args.workers.split(",")):
        r = measure(args.source, tok, workers, args.seconds, args.batch_size, args.seq_len)
        each = r["tok_s"] / max(1, workers)
        per_worker = per_worker or each
        print(f"{workers:>7} {r['tok_s']:>10,.0f} {each:>11,.0f} {r['startup_s']:>10.1f}  {r['epochs']:>6} "
              f"{r['kept']:>5} {r['dropped']:>8}")
    print(f"{args.target:,.0f} tokens/s (nanocode-124m on one H100) needs {math.ceil(args.target / per_worker)} "
          f"loader workers at the first row's {per_worker:,.0f} tokens/s per worker")


if __name__ == "__main__":
    main()
