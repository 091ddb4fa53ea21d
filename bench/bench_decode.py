"""Greedy CPU decoding: fp32 / int8 / int4 tokens per second and load time, side by side on one checkpoint.

    python bench/bench_decode.py                          # a SmolLM-135M-shaped model with random weights
    python bench/bench_decode.py --checkpoint runs/x/checkpoint --threads 2

Without --checkpoint it saves a model of SmolLM-135M's shape (dim 576, 30 layers, 9 heads, 3 KV
heads, FFN 1536, vocabulary 49152) with random weights: decoding costs the same whatever the
weights hold. Each variant runs in a fresh process (as a user's command would), loads the
checkpoint through ``load_for_inference`` (timed: read + quantize), decodes ``--warmup`` tokens,
then times ``--tokens`` more after a 16-token prompt; prefill is not counted. Best of
``--repeats`` timings, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("none", "int8", "int4")
LABELS = {"none": "fp32", "int8": "int8", "int4": "int4 g32"}


def build_checkpoint(out: Path) -> Path:
    """A checkpoint of SmolLM-135M's shape with random weights and a small real tokenizer."""
    import torch

    from codefoundry.checkpoint import save_checkpoint
    from codefoundry.config import ModelConfig
    from codefoundry.data.sources import iter_source_files, read_text, stdlib_root
    from codefoundry.model import Transformer
    from codefoundry.tokenizer import train_tokenizer

    texts = [t for sf in iter_source_files([stdlib_root() / "json"]) if (t := read_text(sf.path)[0])]
    train_tokenizer(texts, 1024, show_progress=False).save(out / "tokenizer.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                      max_seq_len=2048)
    return save_checkpoint(out / "checkpoint", Transformer(cfg), out / "tokenizer.json", preset="smollm-135m-shape")


def measure(checkpoint: str, scheme: str, threads: int, warmup: int, tokens: int, repeats: int) -> dict:
    """Load time and decode rate of one variant, in this process."""
    import torch

    from codefoundry.infer.generate import generate_tokens
    from codefoundry.infer.load import load_for_inference
    from codefoundry.infer.quantize import weight_bytes

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, _ = load_for_inference(checkpoint, "cpu", "fp32", scheme)
    load_s = time.perf_counter() - start
    prompt = list(range(100, 116))
    rates = []
    for _ in range(repeats):
        steps = generate_tokens(model, [prompt], warmup + tokens + 1)
        for _ in range(warmup + 1):
            next(steps)
        start = time.perf_counter()
        n = sum(1 for _ in steps)
        rates.append(n / (time.perf_counter() - start))
    return {"load_s": load_s, "tok_s": max(rates), "weights_mb": weight_bytes(model) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="default: build the 135M-shaped random model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of none,int8,int4")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: measure one variant
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.checkpoint, args.one, args.threads, args.warmup, args.tokens, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(build_checkpoint(Path(tmp)))
        print(f"checkpoint {checkpoint}, {args.threads} threads, {args.tokens} greedy tokens after a 16-token prompt")
        variants = args.variants.split(",")
        print(f"{'weights':<10} {'MB':>7} {'load s':>7} {'decode tok/s':>13} {'vs ' + LABELS[variants[0]]:>8}")
        base = None
        for scheme in variants:
            child = [sys.executable, __file__, "--one", scheme, "--checkpoint", checkpoint,
                     *(f"--{k}={getattr(args, k)}" for k in ("threads", "tokens", "warmup", "repeats"))]
            r = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
            base = base or r["tok_s"]
            print(f"{LABELS[scheme]:<10} {r['weights_mb']:7.1f} {r['load_s']:7.2f} {r['tok_s']:13.1f} "
                  f"{r['tok_s'] / base:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
