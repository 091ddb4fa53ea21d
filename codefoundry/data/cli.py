"""`codefoundry data prepare`: source files in, tokenized shards out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codefoundry.data.prepare import prepare
from codefoundry.data.sources import stdlib_root
from codefoundry.tokenizer import CodeTokenizer


def run_prepare(args: argparse.Namespace) -> int:
    sources = [Path(s) for s in args.source] or [stdlib_root()]
    tokenizer = CodeTokenizer.from_file(args.tokenizer)
    languages = set(args.languages.split(",")) if args.languages else None
    result = prepare(sources, tokenizer, Path(args.out), args.val_fraction, languages)
    print(json.dumps({s: {k: result[s][k] for k in ("documents", "tokens", "bytes")} for s in result}, indent=2))
    skipped = result["train"]["skipped"]["counts"]
    if skipped:
        print(f"skipped files: {skipped} (examples in {args.out}/train/metadata.json)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare pretokenized training data")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = sub.add_parser("prepare", help="tokenize folders of code into train/val shards")
    d.add_argument("--source", action="append", default=[], help="folder or file of code (repeatable; default: stdlib)")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json from `tokenizer train`")
    d.add_argument("--out", required=True, help="output directory (gets train/, val/, tokenizer.json)")
    d.add_argument("--val-fraction", type=float, default=0.04, help="fraction of files held out (by path hash)")
    d.add_argument("--languages", default="", help="comma-separated languages to keep (default: all)")
    d.set_defaults(func=run_prepare)
