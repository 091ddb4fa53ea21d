"""`codefoundry sft`, `codefoundry dpo` and `codefoundry sft-data` (built-in data builders)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from codefoundry.errors import UserError
from codefoundry.train.cli import resume_arg, train_and_report, training_parser


def run_sft(args: argparse.Namespace) -> int:
    from codefoundry.post.sft import SFT_DEFAULTS, sft
    from codefoundry.post.sft_data import Source

    return _finetune(args, SFT_DEFAULTS, sft, [Source.parse(d) for d in args.data])


def run_dpo(args: argparse.Namespace) -> int:
    from codefoundry.post.dpo import DPO_DEFAULTS, dpo
    from codefoundry.post.sft_data import Source

    return _finetune(args, DPO_DEFAULTS, dpo, Source.parse(args.data), beta=args.beta, reference=args.reference)


def _finetune(args: argparse.Namespace, defaults: dict[str, Any], train: Callable[..., dict[str, Any]],
              data: Any, **options: Any) -> int:
    """Fine-tune --checkpoint with ``train`` (sft or dpo) on ``data``: the stage's defaults under the
    overrides, --resume, --stop-after and --lora."""
    from codefoundry.post.finetune import finetune_config

    resume = resume_arg(args)
    run = finetune_config(args.checkpoint, defaults, args.overrides, args.out)
    return train_and_report(train, args.checkpoint, data, run=run, resume=resume, stop_after=args.stop_after,
                            lora=args.lora, **options)


def _add_lora(p: argparse.ArgumentParser) -> None:
    """--lora, which sft and dpo share."""
    p.add_argument("--lora", default=None, metavar="r=16,alpha=32,targets=q_proj,v_proj",
                   help="train LoRA adapters only (targets=all-linear: every projection); checkpoints stay "
                        "plain merged models, the adapter alone goes to OUT/adapter (give it again to --resume)")


def write_jsonl(records: Iterable[dict[str, Any]], out: str | Path) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def run_docstrings(args: argparse.Namespace) -> int:
    from codefoundry.data.sources import stdlib_root
    from codefoundry.post.builders import docstring_pairs

    skipped: Counter = Counter()
    sources = [Path(s) for s in args.source] or [stdlib_root()]
    n = write_jsonl(docstring_pairs(sources, args.limit, skipped), args.out)
    print(f"{n} instruction pairs -> {args.out} (skipped: {dict(skipped)})")
    return 0


def run_tools(args: argparse.Namespace) -> int:
    from codefoundry.post.builders import tool_use_conversations

    n = write_jsonl(tool_use_conversations(args.count, args.seed), args.out)
    print(f"{n} tool-use conversations -> {args.out}")
    return 0


def run_test_pairs(args: argparse.Namespace) -> int:
    from codefoundry.infer.load import load_for_inference
    from codefoundry.post.builders import preference_pairs_from_tests

    path = Path(args.problems)
    if not path.is_file():
        raise UserError(f"problems file {path} not found (JSONL with prompt and test, e.g. HumanEval)")
    problems = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(record, dict) or not {"prompt", "test"} <= set(record):
                raise UserError(f"{path}:{n}: every line needs 'prompt' and 'test'")
            problems.append(record)
    model, tok = load_for_inference(args.checkpoint, args.device, dtype="fp32")
    pairs = preference_pairs_from_tests(model, tok, problems, args.samples, args.max_new_tokens, args.temperature)
    n = write_jsonl(pairs, args.out)
    print(f"{n} preference pairs from {len(problems)} problems -> {args.out}")
    return 0


def register(subparsers) -> None:
    s = training_parser(subparsers, "sft", "supervised fine-tuning on chat data (loss on assistant tokens)",
                        "SFT. Train settings as overrides, e.g. train.lr=1e-4 train.max_steps=500.",
                        "train.field=value overrides")
    s.add_argument("--checkpoint", required=True, help="checkpoint to fine-tune")
    s.add_argument("--data", action="append", required=True,
                   help="PATH.jsonl[@WEIGHT] or hf:NAME[:SPLIT][@WEIGHT] (repeatable; mixed by weight)")
    s.add_argument("--out", required=True, help="run directory (out/checkpoint, metrics.jsonl)")
    _add_lora(s)
    s.set_defaults(func=run_sft)

    d = training_parser(subparsers, "dpo", "direct preference optimization on prompt/chosen/rejected pairs",
                        "DPO. Train settings as overrides, e.g. train.lr=1e-5 train.max_steps=200.",
                        "train.field=value overrides")
    d.add_argument("--checkpoint", required=True, help="checkpoint to train (usually after SFT)")
    d.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected} (or hf:NAME)")
    d.add_argument("--out", required=True, help="run directory")
    d.add_argument("--reference", default=None, help="frozen reference checkpoint (default: --checkpoint)")
    d.add_argument("--beta", type=float, default=0.1, help="strength of the KL anchor to the reference")
    _add_lora(d)
    d.set_defaults(func=run_dpo)

    b = subparsers.add_parser("sft-data", help="build post-training data without downloads")
    sub = b.add_subparsers(dest="builder", metavar="BUILDER", required=True)
    ds = sub.add_parser("docstrings", help="instruction pairs: function signature + docstring -> body")
    ds.add_argument("--source", action="append", default=[], help="folder of code (default: the standard library)")
    ds.add_argument("--limit", type=int, default=0, help="at most this many pairs (0 = all)")
    ds.add_argument("--out", required=True, help="output JSONL")
    ds.set_defaults(func=run_docstrings)
    tl = sub.add_parser("tools", help="tool-use conversations made by really running the agent tools")
    tl.add_argument("--count", type=int, default=200)
    tl.add_argument("--seed", type=int, default=0)
    tl.add_argument("--out", required=True, help="output JSONL")
    tl.set_defaults(func=run_tools)
    tp = sub.add_parser("test-pairs", help="DPO pairs: sampled answers that pass vs fail a problem's tests")
    tp.add_argument("--checkpoint", required=True)
    tp.add_argument("--problems", required=True, help="JSONL with prompt, test (and entry_point), e.g. HumanEval")
    tp.add_argument("--samples", type=int, default=8, help="answers sampled per problem")
    tp.add_argument("--max-new-tokens", type=int, default=256)
    tp.add_argument("--temperature", type=float, default=0.8)
    tp.add_argument("--device", default="auto")
    tp.add_argument("--out", required=True, help="output JSONL")
    tp.set_defaults(func=run_test_pairs)
