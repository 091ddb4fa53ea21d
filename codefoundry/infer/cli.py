"""`codefoundry generate`: complete code (or infill with --fim) from a checkpoint, streaming."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codefoundry.errors import UserError


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"prompt file {path} not found")
        return path.read_text()
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise UserError("give a prompt: --prompt TEXT, --file PATH, or pipe it on stdin")


def run_generate(args: argparse.Namespace) -> int:
    from codefoundry.infer.generate import stream
    from codefoundry.train.checkpoint import load_model
    from codefoundry.train.runtime import resolve_device

    model, tokenizer = load_model(args.checkpoint, resolve_device(args.device))
    if args.fim:
        prompt: str | list[int] = tokenizer.fim_prompt(read_prompt(args), args.suffix or "")
    else:
        prompt = read_prompt(args)
        sys.stdout.write(prompt)
    for _ in range(args.num_samples):
        for piece in stream(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k,
                            args.top_p, args.stop, args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        args.seed += 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample completions from a checkpoint (streams to stdout)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--prompt", default=None, help="prompt text (else --file or stdin)")
    p.add_argument("--file", default=None, help="read the prompt (the prefix with --fim) from a file")
    p.add_argument("--fim", action="store_true", help="fill in the middle between the prompt and --suffix")
    p.add_argument("--suffix", default=None, help="code after the gap (with --fim)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_generate)
