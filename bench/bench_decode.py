"""Greedy CPU decoding on one checkpoint, side by side: ours (fp32 / int8 / int4) and llama.cpp on
the checkpoint's own GGUF export (F16 / Q8_0 / Q4_0 / Q4_1): tokens per second and load time.

    python bench/bench_decode.py                              # a SmolLM-135M-shaped model, random weights
    python bench/bench_decode.py --checkpoint runs/x/checkpoint --threads 1,2

Without --checkpoint it saves a model of SmolLM-135M's shape (dim 576, 30 layers, 9 heads, 3 KV
heads, FFN 1536, vocabulary 49152) with random weights: decoding costs the same whatever the
weights hold. The llama.cpp files come from ``codefoundry export --format gguf`` of the same
checkpoint (its 4-bit types keep the embedding/output head at Q8_0, as our int4 keeps it int8).

Every figure comes from a fresh process (as a user's command would run): it loads the weights
(timed: read + quantize for ours, read + context for llama.cpp), then, after the same 16-token
prompt, decodes ``--warmup`` tokens and times ``--tokens`` more, greedy, with the same thread
count; prefill is not counted. Rounds interleave the variants (every variant once, then again),
and each column shows the best of ``--rounds`` and the spread, so a burst of load from others
hits every column alike and the best keeps the least disturbed run.

The llama.cpp columns need llama-cpp-py-sync (the dev extra); where its prebuilt library does not
load, see ``codefoundry/export/llamacpp.py`` (``LLAMA_CPP_LIB``). Without it they are left out, said why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OURS = {"fp32": "none", "int8": "int8", "int4": "int4"}  # variant -> --quantize scheme
GGUF = ("f32", "f16", "q8_0", "q4_0", "q4_1")  # llama.cpp variants are "gguf-<type>"
DEFAULT_VARIANTS = "fp32,int8,int4,gguf-f16,gguf-q8_0,gguf-q4_0,gguf-q4_1"
LABELS = {"fp32": "ours fp32", "int8": "ours int8", "int4": "ours int4 g32",
          **{f"gguf-{t}": f"llama.cpp {t.upper()}" for t in GGUF}}
PROMPT = list(range(100, 116))


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


def decode_rates(steps: Iterator, warmup: int) -> dict:
    """Tokens per wall-clock second and per CPU second (this process, all threads) of a greedy step
    iterator, after ``warmup`` + the first (prefill) step. On a shared machine the CPU-time rate is
    the steadier one: time spent waiting for a core is not counted."""
    for _ in range(warmup + 1):
        next(steps)
    wall, cpu = time.perf_counter(), time.process_time()
    n = sum(1 for _ in steps)
    return {"tok_s": n / (time.perf_counter() - wall), "tok_cpu_s": n / (time.process_time() - cpu)}


def measure(variant: str, weights: str, threads: int, warmup: int, tokens: int) -> dict:
    """Load time, decode rate and weight bytes of one variant, in this process."""
    new = warmup + tokens + 1
    if variant.startswith("gguf-"):
        from codefoundry.export.llamacpp import LlamaCpp

        start = time.perf_counter()
        llm = LlamaCpp(weights, threads, n_ctx=max(512, len(PROMPT) + new + 1))
        load_s = time.perf_counter() - start
        return {"load_s": load_s, **decode_rates(llm.greedy(PROMPT, new), warmup),
                "weights_mb": Path(weights).stat().st_size / 1e6}
    import torch

    from codefoundry.infer.generate import generate_tokens
    from codefoundry.infer.load import load_for_inference
    from codefoundry.infer.quantize import weight_bytes

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, _ = load_for_inference(weights, "cpu", "fp32", OURS[variant])
    load_s = time.perf_counter() - start
    return {"load_s": load_s, **decode_rates(generate_tokens(model, [PROMPT], new), warmup),
            "weights_mb": weight_bytes(model) / 1e6}


def run_child(variant: str, weights: str, threads: int, args: argparse.Namespace) -> dict:
    child = [sys.executable, __file__, "--one", variant, "--weights", weights, f"--threads={threads}",
             f"--tokens={args.tokens}", f"--warmup={args.warmup}"]
    done = subprocess.run(child, capture_output=True, text=True, check=False)
    if done.returncode:  # e.g. llama.cpp's library does not load here: that column is left out, with the reason
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_files(checkpoint: str, variants: list[str], out: Path) -> dict[str, str]:
    """variant -> weights path: the checkpoint for ours, a GGUF export of it for llama.cpp."""
    from codefoundry.export.gguf_export import export_gguf

    paths = {}
    for v in variants:
        if v.startswith("gguf-"):
            start = time.perf_counter()
            paths[v] = str(export_gguf(checkpoint, out / f"{v}.gguf", v.removeprefix("gguf-")).path)
            print(f"exported {LABELS[v]} in {time.perf_counter() - start:.1f} s", flush=True)
        else:
            paths[v] = checkpoint
    return paths


def print_ratios(results: dict[str, list[dict]]) -> None:
    """Our quantized decode against our fp32 and llama.cpp's 4-bit files, by best wall and best CPU-time rate."""
    best = {v: (max(r["tok_s"] for r in rs), max(r["tok_cpu_s"] for r in rs)) for v, rs in results.items() if rs}
    pairs = [(ours, ref) for ours in ("int8", "int4") for ref in ("fp32", "gguf-q4_0", "gguf-q4_1")
             if ours in best and ref in best]
    for ours, ref in pairs:
        (w, c), (rw, rc) = best[ours], best[ref]
        print(f"  {LABELS[ours]} / {LABELS[ref]}: {w / rw:.2f}x wall, {c / rc:.2f}x CPU time")


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench(args: argparse.Namespace, checkpoint: str, tmp: Path) -> None:
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in LABELS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown[0]}; use some of {', '.join(LABELS)}")
    paths = export_files(checkpoint, variants, tmp)
    for threads in [int(t) for t in str(args.threads).split(",")]:
        print(f"\n{threads} thread(s), {args.tokens} greedy tokens after a {len(PROMPT)}-token prompt, best of "
              f"{args.rounds} interleaved rounds; {load_average()}", flush=True)
        results: dict[str, list[dict]] = {v: [] for v in variants}
        errors: dict[str, str] = {}
        for _ in range(args.rounds):
            for v in variants:
                if v not in errors:
                    r = run_child(v, paths[v], threads, args)
                    if "error" in r:
                        errors[v] = r["error"]
                    else:
                        results[v].append(r)
        print(f"{'weights':<16} {'MB':>7} {'load s':>7} {'tok/s':>7} {'(range)':>13} {'tok/CPU-s':>10} "
              f"{'(range)':>13}")
        for v in variants:
            if v in errors:
                print(f"{LABELS[v]:<16} left out: {errors[v]}")
                continue
            wall, cpu = ([r[k] for r in results[v]] for k in ("tok_s", "tok_cpu_s"))
            print(f"{LABELS[v]:<16} {results[v][0]['weights_mb']:7.1f} {min(r['load_s'] for r in results[v]):7.2f} "
                  f"{max(wall):7.1f} {f'({min(wall):.1f}-{max(wall):.1f})':>13} {max(cpu):10.1f} "
                  f"{f'({min(cpu):.1f}-{max(cpu):.1f})':>13}", flush=True)
        print_ratios(results)
        print(f"({load_average()} at the end)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="default: build the 135M-shaped random model")
    p.add_argument("--threads", default="2", help="thread counts, comma-separated (e.g. 1,2)")
    p.add_argument("--tokens", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the best")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated subset of {', '.join(LABELS)}")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: measure one variant once
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.weights, int(args.threads), args.warmup, args.tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(build_checkpoint(Path(tmp)))
        print(f"checkpoint {checkpoint}")
        bench(args, checkpoint, Path(tmp))


if __name__ == "__main__":
    main()
