"""Training throughput of the presets, and the cost of MoE dispatch against its dense twin.

    python bench/bench_presets.py                # CPU: every tiny preset + MoE dispatch
    python bench/bench_presets.py --gpu          # CUDA: also the 150M-class presets (tok/s, MFU)

Figures are printed, never asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from codefoundry.config import ModelConfig
from codefoundry.model import Transformer
from codefoundry.model.mlp import MLP
from codefoundry.model.moe import MoE, moe_dispatch
from codefoundry.presets import get_preset
from codefoundry.train.runtime import peak_flops

TINY = ["tiny", "cf-tiny", "moe-tiny", "yxanul-tiny", "nanocode-tiny", "pythoncoder-tiny"]
GPU_PRESETS = ["cf-150m", "yxanul-197m", "nanocode-124m", "moe-60m"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(cfg: ModelConfig, batch: int, seq: int, steps: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[float, float | None]:
    """(tokens/s, MFU or None) of forward + backward + AdamW step, after two warm-up steps."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    for i in range(steps + 2):
        if i == 2:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.post_step()
    _sync(device)
    tok_s = batch * seq * steps / (time.perf_counter() - t0)
    peak = peak_flops(device)
    return tok_s, (model.flops_per_token(seq) * tok_s / peak if peak else None)


def moe_vs_dense(cfg: ModelConfig, tokens: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds per forward + backward of one MoE layer and of a dense MLP with the same active width.

    On CUDA under bf16 autocast, so the MoE layer takes its grouped-GEMM dispatch; on CPU in fp32
    it runs every expert on every token (``moe_dispatch``), n_experts / top_k times the routed work.
    """
    torch.manual_seed(0)
    moe = MoE(cfg).to(device)
    active = (cfg.moe_top_k + cfg.moe_shared_experts) * cfg.ffn_dim
    dense = MLP(dataclasses.replace(cfg, n_experts=0), width=active).to(device)
    x = torch.randn(tokens, cfg.dim, device=device, requires_grad=True)
    times = []
    for layer in (moe, dense):
        for i in range(steps + 1):
            if i == 1:
                _sync(device)
                t0 = time.perf_counter()
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out = layer(x)
            out.float().sum().backward()
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return times[0], times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="also benchmark the 150M-class presets on CUDA")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    cpu = torch.device("cpu")
    print(f"CPU training throughput, fp32, batch 8 x 128 tokens ({torch.get_num_threads()} threads)")
    for name in TINY:
        tok_s, _ = train_throughput(get_preset(name), 8, 128, args.steps, cpu, torch.float32)
        print(f"  {name:<18} {tok_s:>10,.0f} tok/s")

    moe_cfg = dataclasses.replace(get_preset("moe-60m"), dim=256, ffn_dim=384)
    t_moe, t_dense = moe_vs_dense(moe_cfg, 2048, args.steps, cpu)
    print(f"MoE dispatch on CPU ({moe_dispatch(cpu, torch.float32)}, dim 256, {moe_cfg.n_experts} experts x 384, top-{moe_cfg.moe_top_k} + "
          f"{moe_cfg.moe_shared_experts} shared, 2048 tokens, fwd+bwd): MoE {t_moe * 1e3:.1f} ms, "
          f"dense twin (same active width) {t_dense * 1e3:.1f} ms, ratio {t_moe / t_dense:.2f}x")

    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu: CUDA is not available here; skipped")
            return
        gpu = torch.device("cuda")
        print(f"GPU training throughput on {torch.cuda.get_device_name(gpu)}, bf16 autocast, batch 8 x 2048")
        for name in GPU_PRESETS:
            tok_s, mfu = train_throughput(get_preset(name), 8, 2048, args.steps, gpu, torch.bfloat16)
            mfu_s = f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a (unknown peak)"
            print(f"  {name:<18} {tok_s:>10,.0f} tok/s  {mfu_s}")
        t_moe, t_dense = moe_vs_dense(get_preset("moe-800m"), 16384, args.steps, gpu)
        print(f"MoE dispatch on GPU ({moe_dispatch(gpu, torch.bfloat16)}, moe-800m layer, 16384 tokens): MoE {t_moe * 1e3:.2f} ms, "
              f"dense twin {t_dense * 1e3:.2f} ms, ratio {t_moe / t_dense:.2f}x")


if __name__ == "__main__":
    main()
