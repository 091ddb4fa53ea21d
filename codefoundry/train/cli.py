"""`codefoundry pretrain`, `codefoundry plot`, `codefoundry presets`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codefoundry.config import RunConfig
from codefoundry.errors import UserError
from codefoundry.recipes import build_run_config


def training_parser(subparsers, name: str, help: str, description: str,
                    overrides_help: str) -> argparse.ArgumentParser:
    """A training command's parser (pretrain, sft, dpo): the flags they share (--resume, --stop-after,
    overrides) and the torchrun line of the description; the command adds its own flags."""
    p = subparsers.add_parser(name, help=help, description=f"{description} Multi-GPU: torchrun --nproc-per-node N "
                                                          f"-m codefoundry.cli {name} ...")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    run = p.add_argument_group("resuming")  # listed after the command's own options
    run.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|CHECKPOINT",
                     help="continue the run in --out: 'auto' (default) takes its newest valid checkpoint and "
                          "starts fresh if there is none; or name a checkpoint directory")
    run.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this step")
    return p


def train_and_report(train: Callable[..., dict[str, Any]], *inputs: Any, run: RunConfig, **options: Any) -> int:
    """Run a training function (pretrain, sft, dpo) with the code scorer the command level builds
    (train/ itself may not import the eval layer), leave the process group even on error, print the summary."""
    from codefoundry.eval.during_training import code_scorer
    from codefoundry.train.distributed import shutdown

    try:
        summary = train(*inputs, run=run, scorer=code_scorer(run.train), **options)
    finally:
        shutdown()
    print(json.dumps(summary, indent=2))
    return 0


def resume_arg(args: argparse.Namespace) -> bool | str:
    """The --resume value (False: fresh). `--resume train.x=1`: argparse took the override as the
    value, so it goes back to the overrides and the resume is 'auto'."""
    if args.resume and "=" in args.resume:
        args.overrides, args.resume = [args.resume, *args.overrides], "auto"
    return args.resume or False


def resolve_run(args: argparse.Namespace) -> RunConfig:
    """Preset/recipe/overrides; on --resume, the saved run config of the checkpoint it continues
    from with the same overrides on top (a fresh config when ``--resume auto`` finds none yet).
    ``--out`` and ``--data`` always win over what a saved config recorded."""
    resume_arg(args)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"train.data={args.data}")
    if args.out:
        overrides.append(f"train.out={args.out}")
    base = None
    if args.resume:
        from codefoundry.train.checkpoint import CheckpointManager

        if not args.out:
            raise UserError("--resume needs --out RUN_DIR (the directory of the run to continue)")
        found = CheckpointManager(args.out).find_resume(args.resume, report=False)  # the run reports skips
        base = found[1]["run"] if found is not None else None
    return build_run_config(args.preset, args.config, overrides, base=base)


def run_pretrain(args: argparse.Namespace) -> int:
    if args.smoke_test:
        import tempfile

        from codefoundry.train.smoke import smoke_test

        with tempfile.TemporaryDirectory() as tmp:
            result = smoke_test(args.out or tmp, args.preset or "tiny", overrides=args.overrides)
        print(json.dumps(result, indent=2))
        print(f"smoke test passed: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, "
              f"{result['tok_per_s']:,.0f} tokens/s")
        return 0
    from codefoundry.train.trainer import pretrain

    run = resolve_run(args)
    return train_and_report(pretrain, run=run, resume=resume_arg(args), stop_after=args.stop_after)


def run_plot(args: argparse.Namespace) -> int:
    from codefoundry.train.plot import plot_run

    run = Path(args.run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "metrics.png"
    print(plot_run(run, out))
    return 0


def run_presets(args: argparse.Namespace) -> int:
    import torch

    from codefoundry.model import Transformer
    from codefoundry.presets import DESCRIPTIONS, PRESETS, features, get_preset

    print(f"{'preset':<16} {'params':>10} {'active':>10}  {'layers':>6} {'dim':>5} {'heads':>5} {'kv':>3}  description")
    for name in PRESETS:
        cfg = get_preset(name)
        with torch.device("meta"):
            model = Transformer(cfg)
        n, active = model.num_params(), model.num_active_params()
        print(f"{name:<16} {n / 1e6:>9.1f}M {active / 1e6:>9.1f}M  {cfg.n_layers:>6} {cfg.dim:>5} {cfg.n_heads:>5} "
              f"{cfg.n_kv_heads:>3}  {DESCRIPTIONS[name]}: {features(cfg)}")
    return 0


def register(subparsers) -> None:
    p = training_parser(subparsers, "pretrain", "pretrain a model on prepared data",
                        "Pretrain. Any config field can be overridden: train.lr=1e-3 model.dim=512.",
                        "section.field=value overrides")
    p.add_argument("--preset", default=None, help="model preset (see `codefoundry presets`)")
    p.add_argument("--config", default=None, help="YAML recipe (see configs/)")
    p.add_argument("--data", default=None, help="prepared data directory (train.data)")
    p.add_argument("--out", default=None, help="run directory (train.out)")
    p.add_argument("--smoke-test", action="store_true",
                   help="train a tiny model on synthetic data for a few seconds to check this machine")
    p.set_defaults(func=run_pretrain)

    pl = subparsers.add_parser("plot", help="plot a run's metrics to PNG")
    pl.add_argument("run", help="run directory or metrics.jsonl")
    pl.add_argument("--out", default=None, help="PNG path (default: RUN/metrics.png)")
    pl.set_defaults(func=run_plot)

    pr = subparsers.add_parser("presets", help="list model presets with parameter counts")
    pr.set_defaults(func=run_presets)
