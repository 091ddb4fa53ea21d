"""The pretraining loop.

One function, :func:`pretrain`, takes a resolved :class:`RunConfig` and trains: fixed
``max_steps``, or a wall-clock budget (``minutes``) converted into a step count after a
few calibration steps so the schedule and any resume stay exact. The loop keeps the loss
on the device and reads it only when it logs, so it never stalls the GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as st_load_model

from codefoundry.config import RunConfig
from codefoundry.data.loader import PackedLoader
from codefoundry.data.shards import Shard
from codefoundry.errors import UserError
from codefoundry.model import Transformer
from codefoundry.progress import Progress
from codefoundry.train.checkpoint import load_train_state, save_checkpoint
from codefoundry.train.metrics import MetricsLog
from codefoundry.train.optim import build_optimizer
from codefoundry.train.runtime import (autocast, peak_flops, resolve_device, resolve_dtype, set_threads,
                                       use_compile)
from codefoundry.train.schedule import lr_factor

CALIBRATION_STEPS = 10  # time-budgeted runs measure this many steps before fixing the step count


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, shard_dir: Path, batch_size: int, seq_len: int, batches: int,
                  device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over the first ``batches`` batches of a fixed (seed 0) order of the shard."""
    loader = PackedLoader(shard_dir, batch_size, seq_len, seed=0, device=device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    n = min(batches, max(1, loader.n_rows // batch_size))
    for _ in range(n):
        x, y = loader.next_batch()
        with autocast(device, dtype):
            total += model(x, y).float()
    model.train(was_training)
    return (total / n).item()


def _check_data(data: Path) -> None:
    if not (data / "tokenizer.json").is_file() or not (data / "train" / "metadata.json").is_file():
        raise UserError(f"train.data={data} is not a prepared data directory; run `codefoundry data prepare` first")


def pretrain(run: RunConfig, resume: bool = False, stop_after: int | None = None,
             show_progress: bool = True) -> dict[str, Any]:
    """Train ``run`` and return a summary. ``stop_after`` ends early (as if interrupted) after that step."""
    tc = run.train
    set_threads(tc.threads)
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device)
    data = Path(tc.data)
    _check_data(data)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    state = load_train_state(ckpt_dir) if resume else None

    vocab = Shard(data / "train").meta["vocab_size"]
    mcfg = dataclasses.replace(run.model, vocab_size=vocab)
    if tc.seq_len > mcfg.max_seq_len:
        raise UserError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}; raise model.max_seq_len")
    run = dataclasses.replace(run, model=mcfg)
    run.save(out / "run_config.json")

    torch.manual_seed(tc.seed)
    model = Transformer(mcfg).to(device)
    optimizer = build_optimizer(model, tc, device)
    loader = PackedLoader(data / "train", tc.batch_size, tc.seq_len, tc.seed, device=device)
    step, total, elapsed_before, tokens_seen = 0, tc.max_steps, 0.0, 0
    if state is not None:
        st_load_model(model, str(ckpt_dir / "model.safetensors"), device=str(device))
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        step, total = state["step"], state["total_steps"]
        elapsed_before, tokens_seen = state["elapsed"], state["tokens"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    if total == 0 and tc.minutes <= 0:
        raise UserError("set train.max_steps or train.minutes (a time budget)")

    fwd = torch.compile(model) if use_compile(tc.compile, device) else model
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if state is not None else None)
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    flops_per_step = model.flops_per_token(tc.seq_len) * tokens_per_step
    peak = peak_flops(device)
    has_val = (data / "val" / "metadata.json").is_file() and Shard(data / "val").meta["tokens"] > tc.seq_len + 1

    def train_state() -> dict[str, Any]:
        return {"step": step, "total_steps": total, "optimizer": optimizer.state_dict(),
                "loader": loader.state_dict(), "elapsed": elapsed_before + (time.perf_counter() - t0),
                "tokens": tokens_seen, "run": run.to_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}

    def save() -> None:
        save_checkpoint(ckpt_dir, model, data / "tokenizer.json", run.preset, train_state())

    model.train()
    progress = Progress("pretrain", total=total or None, unit="step", enabled=show_progress)
    progress.done = step
    t0 = time.perf_counter()
    t_first = None  # end of the first step of this process (excludes compile / warm-up)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    last_log_t, last_log_step = t0, step
    val_loss = None
    while total == 0 or step < total:
        if stop_after is not None and step >= stop_after:
            break
        optimizer.set_lr_factor(lr_factor(step, total, tc.warmup_steps, tc.schedule, tc.decay_fraction,
                                          tc.min_lr_ratio))
        for _ in range(tc.grad_accum):
            x, y = loader.next_batch()
            with autocast(device, dtype):
                loss = fwd(x, y)
            (loss / tc.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_count += tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad()
        model.post_step()
        step += 1
        tokens_seen += tokens_per_step
        now = time.perf_counter()
        if t_first is None:
            t_first, first_step = now, step
        if total == 0 and step - first_step >= CALIBRATION_STEPS:
            per_step = (now - t_first) / (step - first_step)
            remaining = tc.minutes * 60 - (elapsed_before + now - t0)
            total = max(step + 1, step + int(remaining / per_step))
            progress.total = total
        if step % tc.log_every == 0 or step == total:
            train_loss = (loss_sum / loss_count).item()
            if not math.isfinite(train_loss):
                save_checkpoint(out / "checkpoint-nonfinite", model, data / "tokenizer.json", run.preset)
                raise UserError(f"training loss became {train_loss} at step {step}; lower train.lr "
                                f"(state saved to {out / 'checkpoint-nonfinite'})")
            dt = now - last_log_t
            tok_s = (step - last_log_step) * tokens_per_step / dt if dt > 0 else 0.0
            record = {"step": step, "loss": train_loss, "lr": optimizer.param_groups[-1]["lr"],
                      "grad_norm": grad_norm.item() if grad_norm is not None else None,
                      "tokens": tokens_seen, "tok_per_s": tok_s, "elapsed": elapsed_before + now - t0}
            record.update(model.extra_metrics())
            if peak:
                record["mfu"] = flops_per_step * (step - last_log_step) / dt / peak
            metrics.log(record)
            extra = f"loss {train_loss:.4f} | lr {record['lr']:.2e} | {tok_s:,.0f} tok/s"
            if "mfu" in record:
                extra += f" | MFU {record['mfu']:.1%}"
            progress.update(step - progress.done, extra)
            loss_sum.zero_()
            loss_count, last_log_t, last_log_step = 0, now, step
        if has_val and tc.eval_every and step % tc.eval_every == 0 and step != total:
            val_loss = evaluate_loss(fwd, data / "val", tc.batch_size, tc.seq_len, tc.eval_batches, device, dtype)
            metrics.log({"step": step, "val_loss": val_loss})
        if tc.save_every and step % tc.save_every == 0:
            save()
    finished = total > 0 and step >= total
    if finished and has_val:
        val_loss = evaluate_loss(fwd, data / "val", tc.batch_size, tc.seq_len, tc.eval_batches, device, dtype)
        metrics.log({"step": step, "val_loss": val_loss})
    save()
    elapsed = progress.close(f"val loss {val_loss:.4f}" if val_loss is not None else "")
    summary = {"steps": step, "total_steps": total, "finished": finished, "tokens": tokens_seen,
               "elapsed_s": elapsed_before + elapsed, "val_loss": val_loss,
               "tok_per_s": (step - (state or {}).get("step", 0)) * tokens_per_step / max(elapsed, 1e-9),
               "params": model.num_params(), "checkpoint": str(ckpt_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
