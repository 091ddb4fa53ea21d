"""`codefoundry recipes`: every reference run in configs/, with its budget computed, not hand-written.

For each recipe: parameters (total and active), training tokens, training FLOPs and the hours
they take on 1 and on 8 H100s at a stated MFU. FLOPs are the model's own count
(:meth:`Transformer.flops_per_token`: 6 x active weights + attention scores at each stage's row
length, so a sequence-length curriculum is costed stage by stage). Eight GPUs are assumed to
keep the recipe's global batch (accumulation divided by 8) and to scale perfectly, so the
8-GPU figure is a lower bound.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from codefoundry.config import RunConfig, parse_curriculum
from codefoundry.errors import UserError

H100_BF16_FLOPS = 989.4e12  # H100 SXM dense bf16 peak (NVIDIA datasheet); MFU is quoted against it
DEFAULT_MFU = 0.40
DEFAULT_BYTES_PER_TOKEN = 3.3  # code per BPE token, to size epoch-based runs from data.max_gb (an assumption)


@dataclass
class Budget:
    recipe: str
    preset: str
    params: int
    active_params: int
    steps: int
    tokens: int
    flops: float
    hours_1gpu: float
    hours_8gpu: float
    basis: str  # how the step count was fixed


def run_budget(name: str, run: RunConfig, mfu: float = DEFAULT_MFU,
               bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN) -> Budget:
    """The token and FLOP budget of a resolved run (model built on the meta device: no memory)."""
    import dataclasses

    import torch

    from codefoundry.model import Transformer

    tc = run.train
    cfg = run.model if not run.data.vocab_size else dataclasses.replace(run.model, vocab_size=run.data.vocab_size)
    with torch.device("meta"):
        model = Transformer(cfg)
    tokens_per_step = tc.batch_size * tc.grad_accum * tc.seq_len
    if tc.max_steps:
        steps, basis = tc.max_steps, f"{tc.max_steps:,} steps"
    elif tc.epochs and run.data.max_gb:
        corpus = run.data.max_gb * 1e9 / bytes_per_token
        steps = int(tc.epochs * corpus / tokens_per_step)
        basis = f"{tc.epochs:g} epochs x {run.data.max_gb:g} GB at {bytes_per_token} bytes/token"
    else:
        raise UserError(f"recipe {name}: set train.max_steps, or train.epochs with data.max_gb, to size its budget")
    flops, start = 0.0, 0
    for length, until in [*parse_curriculum(tc.curriculum, tc.seq_len), (tc.seq_len, steps)]:
        n = max(0, min(until, steps) - start)
        flops += model.flops_per_token(length) * tokens_per_step * n
        start = max(start, min(until, steps))
    gpu_seconds = flops / (H100_BF16_FLOPS * mfu)
    return Budget(name, run.preset, model.num_params(), model.num_active_params(), steps, steps * tokens_per_step,
                  flops, gpu_seconds / 3600, gpu_seconds / 8 / 3600, basis)


def recipe_names() -> list[str]:
    from codefoundry.recipes import RECIPE_DIR

    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def table(budgets: list[Budget], mfu: float) -> str:
    lines = [f"{'recipe':<16} {'preset':<15} {'params':>8} {'active':>8} {'tokens':>8} {'FLOPs':>9} "
             f"{'1xH100 h':>9} {'8xH100 h':>9}  budget"]
    for b in budgets:
        lines.append(f"{b.recipe:<16} {b.preset:<15} {b.params / 1e6:>7.1f}M {b.active_params / 1e6:>7.1f}M "
                     f"{b.tokens / 1e9:>7.2f}B {b.flops:>9.2e} {b.hours_1gpu:>9.1f} {b.hours_8gpu:>9.2f}  {b.basis}")
    lines.append(f"hours at {mfu:.0%} MFU of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s (H100 SXM dense bf16) per GPU; "
                 "8 GPUs keep the global batch and scale perfectly")
    return "\n".join(lines)


def run_recipes(args: argparse.Namespace) -> int:
    from codefoundry.recipes import build_run_config

    names = args.names or [n for n in recipe_names() if n != "speedrun"]
    budgets = []
    for name in names:
        run = build_run_config(None, name, args.overrides)
        if not run.train.max_steps and not run.train.epochs:
            print(f"{name}: sized by time (train.minutes={run.train.minutes:g}), no fixed budget")
            continue
        budgets.append(run_budget(name, run, args.mfu, args.bytes_per_token))
    if args.json:
        print(json.dumps([b.__dict__ for b in budgets], indent=2))
    else:
        print(table(budgets, args.mfu))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("recipes", help="list the reference-run recipes with tokens, FLOPs and H100-hours")
    p.add_argument("names", nargs="*", help="recipe names or YAML paths (default: every recipe in configs/)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"assumed MFU (default {DEFAULT_MFU})")
    p.add_argument("--bytes-per-token", type=float, default=DEFAULT_BYTES_PER_TOKEN,
                   help="sizes epoch-based recipes from data.max_gb")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="section.field=value applied to every recipe (e.g. train.max_steps=1000)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_recipes)
