"""Training throughput and memory, printed as figures.

    python bench/bench_train.py --presets cpu --skip-memory                 # CPU: speedrun-cpu + tiny presets
    python bench/bench_train.py --presets cf-350m --seq 2048 --batch 8 \\
        --precisions default,fp8-tensorwise,fp8-rowwise,tcfp12            # one GPU
    python bench/bench_train.py --memory-only                               # chunked-CE peak memory

1. Throughput: tokens/s (and MFU on a known GPU) of the training engine (`codefoundry
   pretrain`) for each preset, next to nanoGPT's plain loop (its ``get_batch`` on the same
   token file) training the same model, seeded alike, on the same device with the same AdamW
   kernel (fused), so the engine's overhead (or gain) is read as a ratio. Both time the same steps after the same warm-up; engine and loop
   alternate for ``--rounds`` rounds and each keeps its best, so a busy shared machine slows
   both rather than one (``--clock cpu --threads 1`` counts CPU time instead of elapsed time).
2. Memory: peak memory of one forward+backward of the loss at vocab 49k, seq 2048, with and
   without chunked cross-entropy (``model.loss_chunk``). CUDA: max_memory_allocated; CPU:
   peak RSS growth of a fresh subprocess per setting (torch's CPU allocator is invisible to
   tracemalloc).

Data is random tokens over the preset's vocabulary (throughput does not depend on content).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from codefoundry.config import TrainConfig
from codefoundry.data.shards import Shard, ShardWriter
from codefoundry.model import Transformer
from codefoundry.presets import get_preset
from codefoundry.recipes import build_run_config
from codefoundry.runtime import autocast, resolve_device, resolve_dtype
from codefoundry.train.engine import Trainer
from codefoundry.train.metrics import read_metrics
from codefoundry.train.runtime import peak_flops, use_compile
from codefoundry.train.smoke import make_synthetic_data
from codefoundry.train.trainer import pretrain


def random_token_data(out: Path, vocab: int, n_tokens: int) -> Path:
    """A prepared-data directory of uniformly random tokens (the tokenizer file is only carried along)."""
    make_synthetic_data(out, n_docs=50)  # tokenizer.json + a small val split
    writer = ShardWriter(out / "train", vocab)
    rng = np.random.default_rng(0)
    for _ in range(n_tokens // 4096):
        writer.add(rng.integers(0, vocab, 4096))
    writer.close({"split": "train", "vocab_size": vocab})
    val = ShardWriter(out / "val", vocab)
    val.close({"split": "val", "vocab_size": vocab})  # empty: no evaluation in the benchmark
    return out


CPU_PRESETS = ["speedrun-cpu", "tiny", "cf-tiny", "moe-tiny", "yxanul-tiny", "nanocode-tiny", "pythoncoder-tiny"]


WARMUP_STEPS = 5  # untimed (compile, allocator warm-up); both runs time the same steps after them
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _mark(device: torch.device, clock) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock()


def trainer_throughput(preset: str, seq: int, batch: int, steps: int, data: Path, precision: str,
                       device: str, compile_: str, clock: str, threads: int) -> dict:
    """Tokens/s of the engine over its steps after warm-up (logging every 5 steps included)."""
    marks: list[float] = []
    real_step = Trainer.train_step

    def timed_step(self):
        result = real_step(self)
        if self.step + 1 in (WARMUP_STEPS, steps):  # self.step counts the steps finished before this one
            marks.append(_mark(self.device, CLOCKS[clock]))
        return result

    with tempfile.TemporaryDirectory() as out:
        run = build_run_config(preset, None, [
            f"train.data={data}", f"train.out={out}", f"train.max_steps={steps}", f"train.seq_len={seq}",
            f"train.batch_size={batch}", "train.log_every=5", "train.warmup_steps=5", f"train.device={device}",
            f"train.linear_precision={precision}", f"train.compile={compile_}", f"model.max_seq_len={max(seq, 64)}",
            "train.keep_last=1", f"train.threads={threads}"])
        Trainer.train_step = timed_step
        try:
            pretrain(run, show_progress=False)
        finally:
            Trainer.train_step = real_step
        records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r.get("mfu") is not None]
    tok_s = (steps - WARMUP_STEPS) * batch * seq / (marks[1] - marks[0])
    return {"tok_per_s": tok_s, "mfu": statistics.median(r["mfu"] for r in records[1:]) if records[1:] else None}


def reference_throughput(preset: str, seq: int, batch: int, steps: int, data: Path, device_name: str,
                         compile_: str, clock: str, threads: int) -> dict:
    """nanoGPT's training loop: its ``get_batch`` (random windows of the same token file), fused
    AdamW, autocast, clip, step; the model built and seeded as the engine builds it."""
    if threads > 0:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device)
    cfg = dataclasses.replace(get_preset(preset), max_seq_len=max(seq, 64))
    torch.manual_seed(TrainConfig.seed)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fwd = torch.compile(model, dynamic=False) if use_compile(compile_, device) else model
    tokens = Shard(data / "train").tokens

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(tokens) - seq - 1, (batch,))
        x = torch.stack([torch.from_numpy(tokens[i:i + seq].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + seq].astype(np.int64)) for i in ix])
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    def step(i: int) -> None:
        with autocast(device, dtype):
            loss = fwd(*get_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(WARMUP_STEPS):  # warm-up (and compile)
        step(i)
    t = _mark(device, CLOCKS[clock])
    for i in range(WARMUP_STEPS, steps):
        step(i)
    tok_s = (steps - WARMUP_STEPS) * batch * seq / (_mark(device, CLOCKS[clock]) - t)
    peak = peak_flops(device)
    return {"tok_per_s": tok_s, "mfu": model.flops_per_token(seq) * tok_s / peak if peak else None}


def loss_peak_memory(loss_chunk: int, vocab: int = 49152, seq: int = 2048, batch: int = 1, dim: int = 256) -> float:
    """Peak bytes above the baseline for one forward+backward of the loss (CUDA: allocator; CPU: RSS)."""
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=vocab, dim=dim, n_heads=4, n_kv_heads=2, n_layers=1,
                              max_seq_len=seq, loss_chunk=loss_chunk)
    if torch.cuda.is_available():
        model = Transformer(cfg).cuda()
        x = torch.randint(0, vocab, (batch, seq + 1), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    code = f"""
import resource, torch, dataclasses
from codefoundry.model import Transformer
from codefoundry.presets import get_preset
torch.set_num_threads(1)
cfg = dataclasses.replace(get_preset('tiny'), vocab_size={vocab}, dim={dim}, n_heads=4, n_kv_heads=2, n_layers=1,
                          max_seq_len={seq}, loss_chunk={loss_chunk})
model = Transformer(cfg)
x = torch.randint(0, {vocab}, ({batch}, {seq} + 1))
model(x[:, :16], x[:, 1:17]).backward()  # touch every code path once, so the baseline includes it
model.zero_grad()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(x[:, :-1], x[:, 1:]).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def compare(preset: str, args: argparse.Namespace) -> dict:
    """Best-of-rounds tokens/s of the reference loop and of the engine for each precision."""
    vocab = get_preset(preset).vocab_size
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = random_token_data(Path(tmp), vocab, max(200_000, args.batch * (args.seq + 1) * 4))
        for _ in range(args.rounds):
            ref = reference_throughput(preset, args.seq, args.batch, args.steps, data, args.device, args.compile,
                                       args.clock, args.threads)
            if ref["tok_per_s"] > out.get("reference_loop", {}).get("tok_per_s", 0):
                out["reference_loop"] = ref
            for precision in args.precisions.split(","):
                r = trainer_throughput(preset, args.seq, args.batch, args.steps, data, precision, args.device,
                                       args.compile, args.clock, args.threads)
                if r["tok_per_s"] > out.get(f"engine_{precision}", {}).get("tok_per_s", 0):
                    out[f"engine_{precision}"] = r
    for r in out.values():
        r["ratio_to_reference"] = r["tok_per_s"] / out["reference_loop"]["tok_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny", help="comma list of presets, or 'cpu' for speedrun-cpu and every "
                                                     "tiny preset")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="alternate loop and engine this often; keep each one's best")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both runs (0: torch's default)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (steadier on a busy shared machine; "
                        "use with --threads 1 so idle threads do not spin)")
    p.add_argument("--compile", default="auto")
    p.add_argument("--precisions", default="default", help="comma list: default,fp8-tensorwise,fp8-rowwise,tcfp12")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "throughput": {}}
    if not args.memory_only:
        presets = CPU_PRESETS if args.presets == "cpu" else args.presets.split(",")
        print(f"seq {args.seq}, batch {args.batch}, {args.steps} steps ({WARMUP_STEPS} untimed), best of "
              f"{args.rounds} rounds, {args.clock} clock, {args.threads or torch.get_num_threads()} threads")
        print(f"{'preset':<18} {'run':<22} {'tok/s':>10} {'MFU':>7} {'x loop':>7}")
        for preset in presets:
            r = compare(preset, args)
            results["throughput"][preset] = r
            for key, v in r.items():
                mfu = f"{v['mfu']:.1%}" if v["mfu"] else "-"
                print(f"{preset:<18} {key:<22} {v['tok_per_s']:>10,.0f} {mfu:>7} {v['ratio_to_reference']:>6.2f}x",
                      flush=True)
    if not args.skip_memory:
        full, chunked = loss_peak_memory(-1), loss_peak_memory(256)  # -1: never chunked
        results["loss_peak_memory_bytes"] = {"full_ce": full, "chunked_ce_256": chunked,
                                             "reduction": 1 - chunked / full}
        print(f"loss fwd+bwd peak memory, vocab 49152, seq 2048: full CE {full / 2**20:,.0f} MiB, "
              f"chunked (256 rows) {chunked / 2**20:,.0f} MiB -> {1 - chunked / full:.0%} less", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
