"""`codefoundry tokenizer train`: learn a byte-level BPE (optionally SuperBPE) from folders of code."""

from __future__ import annotations

import argparse
from pathlib import Path

from codefoundry.data.sources import iter_source_files, read_text, split_of, stdlib_root
from codefoundry.progress import Progress
from codefoundry.tokenizer.bpe import CodeTokenizer, train_tokenizer
from codefoundry.tokenizer.superbpe import chars_per_token, train_superbpe


def corpus_texts(sources: list[Path], max_bytes: int, val_fraction: float, show_progress: bool = True,
                 split: str = "train"):
    """Texts of one split (held-out files never shape the vocabulary), up to ``max_bytes``."""
    progress = Progress("tokenizer corpus", total=max_bytes / 1e6 if max_bytes else None, unit="MB",
                        enabled=show_progress)
    seen = 0
    for sf in iter_source_files(sources):
        if split_of(sf.relpath, val_fraction) != split:
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
    if args.superbpe_transition:
        tok, plain = train_superbpe(texts, args.vocab_size, args.superbpe_transition, show_progress=False)
        report_gain(tok, plain, sources, args.val_fraction)
    else:
        tok = train_tokenizer(texts, args.vocab_size, show_progress=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"tokenizer: vocab {tok.vocab_size} -> {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from codefoundry.tokenizer.pretrained import import_tokenizer

    adopted = import_tokenizer(args.source, args.out, append=not args.no_append, fim_order=args.fim_order)
    for line in adopted.report():
        print(f"tokenizer: {line}")
    print(f"tokenizer: vocab {adopted.tokenizer.vocab_size}, {len(adopted.appended)} role token(s) appended "
          f"-> {args.out}")
    return 0


def report_gain(tok: CodeTokenizer, plain: CodeTokenizer, sources: list[Path], val_fraction: float,
                max_bytes: int = 2_000_000) -> None:
    """Print chars/token of SuperBPE vs plain BPE of the same vocab on held-out files: the point of SuperBPE."""
    held_out = list(corpus_texts(sources, max_bytes, val_fraction, show_progress=False, split="val"))
    if not held_out:
        print("superbpe: no held-out files to measure chars/token on (raise --val-fraction)")
        return
    sup, base = chars_per_token(tok, held_out)[0], chars_per_token(plain, held_out)[0]
    print(f"superbpe: held-out chars/token {sup:.3f} vs plain BPE {base:.3f} at vocab {tok.vocab_size} "
          f"({(sup / base - 1) * 100:+.1f}%)")


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or adopt a pretrained one")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train on folders of code (default: the Python standard library)")
    t.add_argument("--source", action="append", default=[], help="folder or file of code (repeatable)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--max-mb", type=float, default=0, help="train on at most this many MB (0 = all)")
    t.add_argument("--val-fraction", type=float, default=0.04, help="held-out files (by path hash) are excluded")
    t.add_argument("--superbpe-transition", type=int, default=0, metavar="N",
                   help="SuperBPE: plain BPE up to vocab N, then merges across spaces (never newlines) up to "
                        "--vocab-size; reports chars/token against plain BPE (default 0: plain BPE)")
    t.add_argument("--out", default="tokenizer.json", help="output tokenizer.json path")
    t.set_defaults(func=run_train)
    i = sub.add_parser("import", help="adopt a pretrained HF tokenizer: its own special tokens for our roles "
                                      "(EOS, FIM, chat), ours appended for missing ones")
    i.add_argument("source", help="transformers directory, tokenizer.json (tokenizer_config.json beside it is "
                                  "read for the chat template), or hf:NAME")
    i.add_argument("--out", default="tokenizer.json", help="output tokenizer.json (tokenizer_config.json beside it)")
    i.add_argument("--no-append", action="store_true",
                   help="append nothing: commands needing a missing role (e.g. FIM) then refuse")
    i.add_argument("--fim-order", choices=["psm", "spm"], default=None,
                   help="order of the model's FIM prompts (default: psm, or what the source config says)")
    i.set_defaults(func=run_import)
