"""Plain BPE vs SuperBPE at the same vocab: chars/token and bytes/token on held-out files, training time.

    python bench/bench_superbpe.py [--source DIR] [--max-mb 5] [--vocab-size 8192] [--transitions 6144,7168]

Trains on the training split of ``--source`` (default: the standard library) up to ``--max-mb`` and
measures on its held-out files (split by path hash, so they never shaped either vocabulary). Also
prints bulk-encoding speed (the fastokens path for both). Run with ``RAYON_NUM_THREADS=1`` for
per-core figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from codefoundry.data.sources import stdlib_root
from codefoundry.tokenizer import CodeTokenizer, train_superbpe, train_tokenizer
from codefoundry.tokenizer.cli import corpus_texts
from codefoundry.tokenizer.superbpe import chars_per_token


def mb(texts: list[str]) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


def encode_mb_per_s(tok: CodeTokenizer, texts: list[str]) -> float:
    t = time.perf_counter()
    tok.encode_batch(texts)
    return mb(texts) / (time.perf_counter() - t)


def row(name: str, tok: CodeTokenizer, held_out: list[str], train_s: float, base: float | None) -> str:
    chars, nbytes = chars_per_token(tok, held_out)
    gain = f"{(chars / base - 1) * 100:+6.1f}%" if base else "      -"
    return (f"{name:<22} {chars:10.3f} {gain} {nbytes:11.3f} {train_s:9.1f} "
            f"{encode_mb_per_s(tok, held_out):10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(stdlib_root()))
    ap.add_argument("--max-mb", type=float, default=5.0, help="training text (MB)")
    ap.add_argument("--held-out-mb", type=float, default=2.0)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--transitions", default="6144,7168", help="comma-separated SuperBPE transition sizes")
    ap.add_argument("--val-fraction", type=float, default=0.04)
    args = ap.parse_args()

    sources = [Path(args.source)]
    train = list(corpus_texts(sources, int(args.max_mb * 1e6), args.val_fraction, show_progress=False))
    held_out = list(corpus_texts(sources, int(args.held_out_mb * 1e6), args.val_fraction, show_progress=False,
                                 split="val"))
    print(f"train: {len(train)} files, {mb(train):.1f} MB; held out: {len(held_out)} files, {mb(held_out):.1f} MB; "
          f"vocab {args.vocab_size}")
    print(f"{'tokenizer':<22} {'chars/tok':>10} {'gain':>7} {'bytes/tok':>11} {'train s':>9} {'enc MB/s':>10}")

    t = time.perf_counter()
    plain = train_tokenizer(train, args.vocab_size, show_progress=False)
    plain_s = time.perf_counter() - t
    base = chars_per_token(plain, held_out)[0]
    print(row("BPE", plain, held_out, plain_s, None))
    for transition in (int(x) for x in args.transitions.split(",")):
        t = time.perf_counter()
        sup, _ = train_superbpe(train, args.vocab_size, transition, show_progress=False)
        print(row(f"SuperBPE t={transition}", sup, held_out, time.perf_counter() - t, base))


if __name__ == "__main__":
    main()
