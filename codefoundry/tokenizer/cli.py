"""`codefoundry tokenizer train`: learn a byte-level BPE from folders of code."""

from __future__ import annotations

import argparse
from pathlib import Path

from codefoundry.data.sources import iter_source_files, read_text, split_of, stdlib_root
from codefoundry.progress import Progress
from codefoundry.tokenizer.bpe import train_tokenizer


def corpus_texts(sources: list[Path], max_bytes: int, val_fraction: float, show_progress: bool = True):
    """Training-split texts (held-out files never shape the vocabulary), up to ``max_bytes``."""
    progress = Progress("tokenizer corpus", total=max_bytes / 1e6 if max_bytes else None, unit="MB",
                        enabled=show_progress)
    seen = 0
    for sf in iter_source_files(sources):
        if split_of(sf.relpath, val_fraction) != "train":
            continue
        text, reason = read_text(sf.path)
        if reason:
            continue
        n = len(text.encode())
        if max_bytes and seen + n > max_bytes:
            break
        seen += n
        progress.update(n / 1e6)
        yield text
    progress.close()


def run_train(args: argparse.Namespace) -> int:
    sources = [Path(s) for s in args.source] or [stdlib_root()]
    texts = corpus_texts(sources, int(args.max_mb * 1e6), args.val_fraction)
    tok = train_tokenizer(texts, args.vocab_size, show_progress=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"tokenizer: vocab {tok.vocab_size} -> {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train on folders of code (default: the Python standard library)")
    t.add_argument("--source", action="append", default=[], help="folder or file of code (repeatable)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--max-mb", type=float, default=0, help="train on at most this many MB (0 = all)")
    t.add_argument("--val-fraction", type=float, default=0.04, help="held-out files (by path hash) are excluded")
    t.add_argument("--out", default="tokenizer.json", help="output tokenizer.json path")
    t.set_defaults(func=run_train)
