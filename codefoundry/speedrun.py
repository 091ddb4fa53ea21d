"""`codefoundry speedrun`: raw code -> tokenizer -> shards -> pretrained model -> report.

This module is the default CPU run. A reference recipe with a ``data:`` section
(``--recipe nanocode``) runs the GPU pipeline instead: hub download, SFT, pass@k, agent demo
(:mod:`codefoundry.speedrun_recipe`). Every stage is the same code as its stand-alone command,
and writes into ``--out``::

    OUT/tokenizer.json   OUT/data/{train,val}/   OUT/run/{checkpoint,metrics.jsonl}
    OUT/report.md        OUT/loss.png            OUT/results.json
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from pathlib import Path
from typing import Any

from codefoundry.data.sources import iter_source_files, stdlib_root
from codefoundry.progress import silence_tqdm

RECIPES = Path(__file__).resolve().parents[1] / "configs"
# A data worker per core pays off only on big corpora: every stage starts its worker processes
# afresh (~1 s each), which cost more than they saved on the 32 MB default corpus (6.2 s vs 4.0 s).
PARALLEL_DATA_BYTES = 200e6


def code_prompts(texts: list[str], n: int, max_chars: int = 400) -> list[str]:
    """Real prompts from held-out files: a function's header and docstring, the body left to the model."""
    prompts = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and node.body[1:]:
                doc = node.body[0]
                head = "".join(lines[node.lineno - 1:doc.end_lineno])
                if 40 < len(head) <= max_chars:
                    prompts.append(head)
                    break
        if len(prompts) == n:
            break
    return prompts


def write_report(out: Path, results: dict[str, Any], samples: list[tuple[str, str]]) -> Path:
    ev, tr = results["eval"], results["train"]
    baselines = ev["baselines"]
    best = min(baselines.values())
    lines = [
        "# codefoundry speedrun report", "",
        f"Corpus: {', '.join(results['sources'])} — {results['data']['train']['documents']} train files "
        f"({results['data']['train']['bytes'] / 1e6:.1f} MB), {ev['documents']} held-out files "
        f"({ev['bytes'] / 1e6:.2f} MB).",
        f"Model: preset `{results['preset']}`, {tr['params'] / 1e6:.2f}M parameters; "
        f"{tr['steps']} steps, {tr['tokens'] / 1e6:.1f}M tokens in {tr['elapsed_s'] / 60:.1f} min "
        f"({tr['tok_per_s']:,.0f} tokens/s) on {results['device']}.", "",
        "## Held-out bits per byte (lower is better)", "",
        "| coder | bits/byte |", "|---|---|",
        f"| **codefoundry model** | **{ev['bpb']:.3f}** |",
        *[f"| {name} (each file alone) | {v:.3f} |" for name, v in baselines.items()], "",
        f"The model {'beats' if ev['bpb'] < best else 'does NOT beat'} the best compressor "
        f"({ev['bpb']:.3f} vs {best:.3f}). Held-out loss {ev['loss']:.3f} nats/token, "
        f"{ev['bytes'] / ev['tokens']:.2f} bytes/token; windows of {ev['seq_len']} tokens, stride {ev['stride']} "
        "(each token scored once, with at least half a window of context).", "",
        "## Loss", "", "![loss curve](loss.png)", "",
        "## Samples (held-out prompts, temperature 0.6, top-p 0.95)", "",
    ]
    for prompt, completion in samples:
        lines += ["```python", prompt + completion, "```", ""]
    lines += [f"Stage timings (s): {json.dumps({k: round(v, 1) for k, v in results['timings'].items()})}", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def speedrun(out: Path, sources: list[Path], minutes: float, recipe: str | Path | None, overrides: list[str],
             vocab_size: int, tokenizer_mb: float, val_fraction: float, fim_rate: float = 0.0,
             n_samples: int = 4, preset: str | None = None) -> dict[str, Any]:
    # Imported here, not at the top: `codefoundry --help` should not pay for torch and datatrove.
    silence_tqdm()
    from codefoundry.data.prepare import prepare
    from codefoundry.eval.bpb import bits_per_byte, compressor_bpb, shard_texts
    from codefoundry.eval.during_training import code_scorer
    from codefoundry.infer.generate import complete_batch
    from codefoundry.infer.load import load_for_inference
    from codefoundry.recipes import build_run_config
    from codefoundry.tokenizer.bpe import train_tokenizer
    from codefoundry.tokenizer.cli import corpus_texts
    from codefoundry.train.plot import plot_run
    from codefoundry.train.trainer import pretrain

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    print(f"[1/5] tokenizer: byte-level BPE, vocab {vocab_size}", flush=True)
    tokenizer = train_tokenizer(corpus_texts(sources, int(tokenizer_mb * 1e6), val_fraction), vocab_size,
                                show_progress=False)
    tokenizer.save(out / "tokenizer.json")
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[2/5] data: pretokenize train/val shards", flush=True)
    corpus_bytes = sum(sf.path.stat().st_size for sf in iter_source_files(sources))
    workers = (os.cpu_count() or 1) if corpus_bytes > PARALLEL_DATA_BYTES else 1
    data = prepare(sources, tokenizer, out / "data", val_fraction, fim_rate=fim_rate, workers=workers)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[3/5] pretrain: {minutes:g} minute budget", flush=True)
    run = build_run_config(preset, recipe, [*overrides, f"train.data={out / 'data'}", f"train.out={out / 'run'}",
                                          f"train.minutes={minutes}"])
    summary = pretrain(run, scorer=code_scorer(run.train))  # train.humaneval_every=N may be among the overrides
    timings["pretrain"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[4/5] eval: held-out bits per byte vs gzip / xz", flush=True)
    model, tokenizer = load_for_inference(summary["checkpoint"], run.train.device, dtype="fp32")
    ev = bits_per_byte(model, out / "data" / "val", run.train.seq_len, batch_size=16, show_progress=True,
                       stride=run.train.seq_len // 2)
    texts = shard_texts(out / "data" / "val", tokenizer)
    ev["baselines"] = compressor_bpb(texts)
    timings["eval"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[5/5] samples and report", flush=True)
    prompts = code_prompts(texts, n_samples)
    completions = complete_batch(model, tokenizer, prompts, 112, temperature=0.6, top_p=0.95,
                                 stop=["\ndef ", "\nclass ", "\n@"], seed=0)
    plot_run(out / "run" / "metrics.jsonl", out / "loss.png")
    timings["samples"] = time.perf_counter() - t
    results = {"sources": [str(s) for s in sources], "preset": run.preset, "device": str(model.embed.weight.device),
               "data": data, "train": summary, "eval": ev, "timings": timings}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report = write_report(out, results, list(zip(prompts, completions)))
    print(f"held-out bits/byte: model {ev['bpb']:.3f} | " +
          " | ".join(f"{k} {v:.3f}" for k, v in ev["baselines"].items()))
    print(f"report: {report}")
    return results


def run_speedrun(args: argparse.Namespace) -> int:
    from codefoundry.recipes import build_run_config, find_recipe

    recipe = find_recipe(args.config) if args.config else RECIPES / "speedrun.yaml"
    if build_run_config(args.preset, recipe, args.overrides).data.sources:  # a reference run: the GPU pipeline
        from codefoundry.speedrun_recipe import full_speedrun, options_from_args

        full_speedrun(options_from_args(args, recipe))
        return 0
    sources = [Path(s) for s in args.source] or [stdlib_root()]
    speedrun(Path(args.out), sources, 12.0 if args.minutes is None else args.minutes, recipe, args.overrides,
             args.vocab_size or 4096, args.tokenizer_mb, 0.04 if args.val_fraction is None else args.val_fraction,
             args.fim_rate or 0.0, preset=args.preset)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("speedrun", help="the whole pipeline: raw code to a trained model and a report",
                              description="Without --recipe: the 15-minute CPU run on local code. With a reference "
                                          "recipe (e.g. --recipe nanocode; torchrun-aware): hub corpus download, "
                                          "tokenizer, shards, pretraining, HumanEval + MBPP pass@k, SFT on the hub "
                                          "mix, pass@k again, an agent demo, and a report with time and cost.")
    p.add_argument("--source", action="append", default=[],
                   help="folder or file of code (repeatable; default: stdlib, or the recipe's hub corpus)")
    p.add_argument("--out", default="runs/speedrun", help="output directory")
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget in minutes (default: 12 for the CPU run; the recipe's steps otherwise)")
    p.add_argument("--config", "--recipe", dest="config", default=None,
                   help="recipe name in configs/ or YAML path (default: configs/speedrun.yaml)")
    p.add_argument("--preset", default=None, help="model preset instead of the recipe's (e.g. its -tiny twin)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default: the recipe's, else 4096)")
    p.add_argument("--tokenizer-mb", type=float, default=0, help="MB of code to train the tokenizer on (0 = all)")
    p.add_argument("--val-fraction", type=float, default=None, help="held-out share (default 0.04, or the recipe's)")
    p.add_argument("--fim-rate", type=float, default=None,
                   help="fill-in-the-middle rate for the training split (0 spends the short budget on left-to-right)")
    g = p.add_argument_group("reference-recipe runs (--recipe nanocode ...)")
    g.add_argument("--max-gb", type=float, default=None, help="download at most this much of the hub corpus")
    g.add_argument("--hub-mirror", action="append", default=[], metavar="hub:NAME=DIR",
                   help="read a hub corpus from a local folder in the hub's layout instead of the hub")
    g.add_argument("--sft-source", action="append", default=[], metavar="hub:NAME[=PATH][@WEIGHT]",
                   help="replace one SFT mix component (e.g. a local parquet copy), or add a JSONL source")
    g.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default 1000)")
    g.add_argument("--tool-conversations", type=int, default=500, help="synthetic tool-use conversations in the mix")
    g.add_argument("--bench-data", default=None, help="folder with HumanEval.jsonl.gz / mbpp.jsonl (default: download)")
    g.add_argument("--eval-limit", type=int, default=None, help="only the first N tasks of each benchmark")
    g.add_argument("--eval-n", type=int, default=10, help="samples per task for pass@k")
    g.add_argument("--eval-temperature", type=float, default=0.8)
    g.add_argument("--eval-max-new-tokens", type=int, default=384)
    g.add_argument("--usd-per-gpu-hour", type=float, default=2.5, help="price the report's cost is computed at")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides of the recipe")
    p.set_defaults(func=run_speedrun)
