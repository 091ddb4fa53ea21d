"""The first-GPU check: which attention kernel each reference preset takes, and its training speed,
MFU and peak memory in bf16, FP8 (tensorwise, rowwise) and TCFP-12 with torch.compile on;
plus the memory chunked cross-entropy saves at a 49k vocabulary.

    python bench/gpu_check.py                 # one CUDA GPU, about 5 minutes (--budget-s)
    python bench/gpu_check.py --cpu-smoke     # the same code path on the tiny twins, on CPU

Every row runs under ``sdpa_kernel`` without the math backend, so an attention call that would
fall back to the O(T^2) math kernel fails the row instead of running slowly. Any failed row
makes the exit status 1. Rows not reached within the time budget are listed as skipped.
Without CUDA (and without --cpu-smoke) it prints a notice and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from codefoundry.config import ModelConfig
from codefoundry.model import Transformer
from codefoundry.model.masking import attention_kernel
from codefoundry.model.moe import moe_dispatch
from codefoundry.presets import get_preset
from codefoundry.train.runtime import apply_linear_precision, peak_flops

PRESETS = {"cf-150m": "cf-tiny", "cf-350m": "cf-tiny", "nanocode-124m": "nanocode-tiny", "moe-60m": "moe-tiny",
           "yxanul-197m": "yxanul-tiny", "pythoncoder-1b": "pythoncoder-tiny"}
PRECISIONS = ("default", "fp8-tensorwise", "fp8-rowwise", "tcfp12")
LABEL = {"default": "bf16", "fp8-tensorwise": "fp8-tw", "fp8-rowwise": "fp8-rw", "tcfp12": "tcfp12"}


@dataclasses.dataclass
class Setup:
    """What differs between the GPU run and the CPU smoke run; the code path is the same."""

    device: torch.device
    seq: int
    batch: int
    steps: int
    backend: str  # torch.compile backend
    emulate_fp8: bool  # torchao's FP8 emulation (CPU has no FP8 tensor cores)
    sdpa_backends: list[SDPBackend]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _apply_precision(model: Transformer, precision: str, setup: Setup) -> None:
    if precision.startswith("fp8-") and setup.emulate_fp8:
        from codefoundry.train.fp8 import convert_to_fp8

        convert_to_fp8(model, precision.removeprefix("fp8-"), setup.device, emulate=True)
    else:
        apply_linear_precision(model, precision, setup.device)


def measure(cfg: ModelConfig, precision: str, setup: Setup) -> dict:
    """Compile, warm up two steps, then time ``setup.steps`` training steps (AdamW, bf16 autocast)."""
    dev = setup.device
    torch._dynamo.reset()  # a fresh model per row: no guard history, no recompile limit
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    _apply_precision(model, precision, setup)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=dev.type == "cuda")
    fwd = torch.compile(model, backend=setup.backend, fullgraph=True, dynamic=False)
    x = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq + 1), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with sdpa_kernel(setup.sdpa_backends):
        for i in range(setup.steps + 2):
            if i == 2:
                _sync(dev)
                t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = fwd(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.post_step()
    _sync(dev)
    tok_s = setup.batch * setup.seq * setup.steps / (time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {loss.item()}")
    peak = peak_flops(dev, precision)
    return {"tok_s": tok_s, "mfu": model.flops_per_token(setup.seq) * tok_s / peak if peak else None,
            "mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}


def chunked_ce_saving(setup: Setup, vocab: int = 49152) -> tuple[float, float] | None:
    """Peak GiB of the LM head + loss (one thin layer below it) with and without chunking; CUDA only."""
    if setup.device.type != "cuda":
        return None
    peaks = []
    for chunk in (-1, 0):  # never chunked, auto (chunked at this vocabulary)
        cfg = dataclasses.replace(get_preset("cf-150m"), n_layers=1, vocab_size=vocab, loss_chunk=chunk)
        model = Transformer(cfg).to(setup.device)
        x = torch.randint(0, vocab, (setup.batch, setup.seq + 1), device=setup.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        peaks.append(torch.cuda.max_memory_allocated(setup.device) / 2**30)
        del model, loss
    return peaks[0], peaks[1]


def row_order(presets: list[str], precisions: list[str], focus: str = "cf-350m") -> list[tuple[str, str]]:
    """The rows by priority, for when the budget runs out: every preset in bf16, then ``focus`` (the
    preset the FP8-vs-bf16 target is set for) in every other precision, then the rest."""
    first = [(p, "default") for p in presets if "default" in precisions]
    focused = [(focus, q) for q in precisions if q != "default" and focus in presets]
    rest = [(p, q) for q in precisions if q != "default" for p in presets if p != focus]
    return first + focused + rest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny twins on CPU, aot_eager, FP8 emulated")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=280.0, help="stop starting new rows after this many seconds")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        setup = Setup(torch.device("cpu"), seq=64, batch=2, steps=min(args.steps, 2), backend="aot_eager",
                      emulate_fp8=True, sdpa_backends=[SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    elif not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; none here. Nothing was measured (run with --cpu-smoke to exercise the "
              "code path on CPU).")
        return 0
    else:
        setup = Setup(torch.device("cuda"), seq=args.seq, batch=args.batch, steps=args.steps, backend="inductor",
                      emulate_fp8=False, sdpa_backends=[SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                        SDPBackend.CUDNN_ATTENTION])
    where = "CPU smoke run (tiny twins)" if args.cpu_smoke else torch.cuda.get_device_name(setup.device)
    print(f"{where}: batch {setup.batch} x {setup.seq} tokens, {setup.steps} timed steps, "
          f"torch.compile({setup.backend}, fullgraph=True), torch {torch.__version__}")
    header = f"{'preset':<16} {'precision':<9} {'attention':<12} {'moe':<8} {'tok/s':>10} {'MFU':>6} {'peak GiB':>9}  note"
    print(header)
    print("-" * len(header))
    start, failed = time.perf_counter(), 0
    for name, precision in row_order(args.presets, args.precisions):
        cfg = get_preset(PRESETS[name] if args.cpu_smoke else name)
        kernel = attention_kernel(cfg, setup.device, cfg.dropout)
        moe = moe_dispatch(setup.device, torch.bfloat16) if cfg.n_experts else "-"
        row = f"{name:<16} {LABEL[precision]:<9} {kernel:<12} {moe:<8}"
        if time.perf_counter() - start > args.budget_s:
            print(f"{row} {'':>10} {'':>6} {'':>9}  skipped (time budget)")
            continue
        try:
            r = measure(cfg, precision, setup)
        except Exception as e:  # noqa: BLE001 -- every failure is reported, the run goes on, the exit status says so
            failed += 1
            print(f"{row} {'':>10} {'':>6} {'':>9}  FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            traceback.print_exc(file=sys.stderr)
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['mem_gb']:.1f}" if r["mem_gb"] is not None else "n/a"
        print(f"{row} {r['tok_s']:>10,.0f} {mfu:>6} {mem:>9}", flush=True)
    try:
        saving = chunked_ce_saving(setup)
    except Exception as e:  # noqa: BLE001 -- reported, and the exit status says so
        failed += 1
        saving = None
        print(f"chunked cross-entropy: FAILED: {type(e).__name__}: {e}")
    if saving is not None:
        full, chunked = saving
        print(f"chunked cross-entropy, vocab 49152, {setup.batch} x {setup.seq}: peak {full:.2f} GiB unchunked -> "
              f"{chunked:.2f} GiB chunked ({1 - chunked / full:.0%} less)")
    print(f"{failed} row(s) failed" if failed else "all rows ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
