"""Weight-only quantization cost: held-out bits per byte, weight memory and decode speed for
fp32 / bf16 / int8 (per channel) / int4 (group-wise) on one trained model.

    python bench/bench_quantize.py --checkpoint runs/x/checkpoint --data runs/x/data/val
    python bench/bench_quantize.py                      # trains a small model first (~30 s)

Without --checkpoint a small speedrun-like model (dim 128, 4 layers, vocab 2048) is trained
for --train-seconds (30) on part of the Python standard library, and its held-out files are the
evaluation set. bf16 is bf16 autocast over fp32 weights (the baseline the issue names);
the quantized rows run the model in fp32 with bf16 activations inside the quantized matmuls
(see codefoundry/infer/quantize.py). bench/bench_decode.py measures decode speed on a
realistically sized model; the rates here are for a toy one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codefoundry.data.prepare import prepare
from codefoundry.data.sources import iter_source_files, read_text, stdlib_root
from codefoundry.eval.bpb import bits_per_byte
from codefoundry.infer.generate import generate_tokens
from codefoundry.infer.load import load_for_inference
from codefoundry.infer.quantize import quantize_model, weight_bytes
from codefoundry.recipes import build_run_config
from codefoundry.tokenizer import train_tokenizer
from codefoundry.train.trainer import pretrain

SOURCES = ["json", "email", "logging", "asyncio", "http", "xml", "unittest", "concurrent"]


def train_small(work: Path, seconds: float) -> tuple[Path, Path]:
    """(checkpoint, held-out shard dir) of a small model trained for ``seconds``."""
    dirs = [stdlib_root() / d for d in SOURCES]
    texts = [t for sf in iter_source_files(dirs) if (t := read_text(sf.path)[0])]
    tok = train_tokenizer(texts, 2048, show_progress=False)
    prepare(dirs, tok, work / "data", val_fraction=0.1, show_progress=False)
    overrides = [f"train.data={work / 'data'}", f"train.out={work / 'run'}", f"train.minutes={seconds / 60}",
                 "train.seq_len=128", "train.batch_size=16", "train.warmup_steps=20", "train.lr=3e-3",
                 "model.vocab_size=2048", "model.dim=128", "model.n_layers=4", "model.n_heads=4",
                 "model.n_kv_heads=2", "model.max_seq_len=256"]
    summary = pretrain(build_run_config("speedrun-cpu", None, overrides), show_progress=False)
    return Path(summary["checkpoint"]), work / "data" / "val"


def decode_rate(model, tokens: int = 64) -> float:
    """Tokens per second, prompt included, after one warm-up generation (the first call in a
    process pays one-time set-up that would otherwise be charged to whichever row runs first)."""
    prompt = list(range(1, 17))
    sum(1 for _ in generate_tokens(model, [prompt], 8))
    start = time.perf_counter()
    n = sum(1 for _ in generate_tokens(model, [prompt], tokens))
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data", default=None, help="held-out shard directory (with --checkpoint)")
    p.add_argument("--train-seconds", type=float, default=30)
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint, data = Path(args.checkpoint), Path(args.data)
        else:
            t0 = time.perf_counter()
            checkpoint, data = train_small(Path(tmp), args.train_seconds)
            print(f"trained a small model in {time.perf_counter() - t0:.0f}s -> evaluating on {data}")
        rows = []
        base = None
        variants = [("fp32", "none", torch.float32), ("bf16", "none", torch.bfloat16),
                    ("int8", "int8", torch.float32), (f"int4 g{args.group_size}", "int4", torch.float32)]
        for label, scheme, dtype in variants:
            model, _ = load_for_inference(checkpoint, "cpu", "fp32")
            quantize_model(model, scheme, args.group_size)
            bpb = bits_per_byte(model, data, seq_len=args.seq_len, dtype=dtype)["bpb"]
            base = bpb if label == "bf16" else base
            rows.append((label, bpb, weight_bytes(model), decode_rate(model)))
    print(f"{'weights':<10} {'bpb':>8} {'vs bf16':>8} {'MB':>7} {'decode tok/s':>13}")
    for label, bpb, size, rate in rows:
        print(f"{label:<10} {bpb:8.4f} {bpb / base - 1:+8.2%} {size / 1e6:7.2f} {rate:13.0f}")


if __name__ == "__main__":
    main()
