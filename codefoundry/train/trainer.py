"""The pretraining loop.

One function, :func:`pretrain`, takes a resolved :class:`RunConfig` and trains: fixed
``max_steps``, or a wall-clock budget (``minutes``) converted into a step count after a
few calibration steps so the schedule and any resume stay exact. The loop keeps the loss
on the device and reads it only when it logs, so it never stalls the GPU (the NaN/spike
guard, on by default, reads one scalar per step; ``train.nan_guard=false`` removes it).

Launched by ``torchrun`` it trains with DDP or FSDP2 (``train.parallel``); every rank runs
this same function on its slice of each global batch, and only rank 0 logs.
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

from codefoundry.config import RunConfig, parse_curriculum
from codefoundry.data.loader import PackedLoader
from codefoundry.data.shards import Shard
from codefoundry.errors import UserError
from codefoundry.model import Transformer
from codefoundry.model.transformer import IGNORE_INDEX
from codefoundry.progress import Progress
from codefoundry.runtime import autocast, resolve_device, resolve_dtype, set_threads
from codefoundry.train import distributed as D
from codefoundry.train.checkpoint import CheckpointManager
from codefoundry.train.guard import StepGuard
from codefoundry.train.metrics import MetricsLog
from codefoundry.train.optim import build_optimizer
from codefoundry.train.runtime import (
    apply_linear_precision,
    enable_activation_checkpointing,
    peak_flops,
    use_compile,
)
from codefoundry.train.schedule import curriculum_seq_len, lr_factor

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


def pretrain(run: RunConfig, resume: bool | str = False, stop_after: int | None = None,
             show_progress: bool = True) -> dict[str, Any]:
    """Train ``run`` and return a summary.

    ``resume``: False (fresh), True or "auto" (the newest valid checkpoint in ``train.out``,
    fresh if there is none) or a checkpoint directory. ``stop_after`` ends early (as if
    interrupted) after that step.
    """
    tc = run.train
    set_threads(tc.threads)
    info = D.init_distributed(tc.parallel, tc.device)
    device = D.rank_device(resolve_device(tc.device), info)
    dtype = resolve_dtype(tc.dtype, device)
    data = Path(tc.data)
    _check_data(data)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = CheckpointManager(out, tc.keep_last, tc.keep_best, info)
    found = ckpts.find_resume(resume)
    ckpt_dir, state = found if found else (None, None)

    vocab = Shard(data / "train").meta["vocab_size"]
    mcfg = dataclasses.replace(run.model, vocab_size=vocab)  # rounded up to model.vocab_multiple
    if mcfg.vocab_size != run.model.vocab_size and info.is_main:
        print(f"model.vocab_size {run.model.vocab_size} -> {mcfg.vocab_size}: the data's tokenizer has {vocab} tokens",
              flush=True)
    if tc.seq_len > mcfg.max_seq_len:
        raise UserError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}; raise model.max_seq_len")
    if tc.optimizer == "muon" and info.sharded:
        raise UserError("train.optimizer=muon needs whole matrices; use train.parallel=ddp (or adamw with fsdp)")
    stages = parse_curriculum(tc.curriculum, tc.seq_len)
    run = dataclasses.replace(run, model=mcfg)
    if info.is_main:
        run.save(out / "run_config.json")

    torch.manual_seed(tc.seed)
    model = Transformer(mcfg).to(device)
    apply_linear_precision(model, tc.linear_precision, device)
    if tc.activation_checkpointing:
        enable_activation_checkpointing(model)
    if state is not None and not state.get("sharded"):
        st_load_model(model, str(ckpt_dir / "model.safetensors"), device=str(device))
    wrapped = D.wrap_model(model, info, device)
    optimizer = build_optimizer(model, tc, device)
    loader = PackedLoader(data / "train", tc.batch_size, tc.seq_len, tc.seed, info.rank, info.world_size, device)
    guard = StepGuard(tc.nan_guard, tc.spike_factor, tc.max_skips, tc.warmup_steps, info)
    step, total, elapsed_before, tokens_seen = 0, tc.max_steps, 0.0, 0
    if state is not None:
        if state.get("sharded"):
            D.load_sharded(ckpt_dir / "dcp", model, optimizer.optimizers)
        else:
            optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        guard.load_state_dict(state.get("guard", {}), device)
        step = state["step"]
        total = tc.max_steps or state["total_steps"]  # an explicit max_steps may extend a finished run
        elapsed_before, tokens_seen = state["elapsed"], state["tokens"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    if total == 0 and tc.minutes <= 0:
        raise UserError("set train.max_steps or train.minutes (a time budget)")

    fwd = torch.compile(wrapped) if use_compile(tc.compile, device) else wrapped
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if state is not None else None,
                         enabled=info.is_main, tensorboard=tc.tensorboard, wandb_project=tc.wandb_project,
                         config=run.to_dict())
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * info.world_size
    peak = peak_flops(device)
    has_val = (data / "val" / "metadata.json").is_file() and Shard(data / "val").meta["tokens"] > tc.seq_len + 1
    tokenizer_json = data / "tokenizer.json"

    def save(val: float | None = None) -> None:
        train_state = {"step": step, "total_steps": total, "loader": loader.state_dict(),
                       "elapsed": elapsed_before + (time.perf_counter() - t0), "tokens": tokens_seen,
                       "run": run.to_dict(), "guard": guard.state_dict(),
                       "rng": {"torch": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        if not info.sharded:
            train_state["optimizer"] = optimizer.state_dict()
        ckpts.save(step, model, tokenizer_json, run.preset, train_state, val, optimizer.optimizers)

    def evaluate() -> float:
        return evaluate_loss(fwd, data / "val", tc.batch_size, tc.seq_len, tc.eval_batches, device, dtype)

    model.train()
    progress = Progress("pretrain", total=total or None, unit="step", enabled=show_progress and info.is_main)
    progress.done = step
    t0 = time.perf_counter()
    t_first = None  # end of the first step of this process (excludes compile / warm-up)
    loss_sum = torch.zeros((), device=device)
    loss_count, skipped_since_log = 0, 0
    last_log_t, last_log_step, last_saved = t0, step, step if state is not None else -1
    val_loss = None
    while total == 0 or step < total:
        if stop_after is not None and step >= stop_after:
            break
        optimizer.set_lr_factor(lr_factor(step, total, tc.warmup_steps, tc.schedule, tc.decay_fraction,
                                          tc.min_lr_ratio))
        seq = curriculum_seq_len(step, stages, tc.seq_len)
        batches = [loader.next_batch(seq) for _ in range(tc.grad_accum)]
        # Sum the token losses and divide once by the step's target count, so accumulated
        # micro-batches weigh every token equally even when some targets are masked.
        n_targets = sum((y != IGNORE_INDEX).sum() for _, y in batches).clamp(min=1)
        step_loss = torch.zeros((), device=device)
        for i, (x, y) in enumerate(batches):
            with D.grad_sync(wrapped, info, i == len(batches) - 1), autocast(device, dtype):
                loss = fwd(x, y, reduction="sum")
            (loss / n_targets).backward()
            step_loss += loss.detach().float()
        step_loss /= n_targets
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        if guard.healthy(step, step_loss, grad_norm):
            optimizer.step()
            model.post_step()
            loss_sum += step_loss
            loss_count += 1
        else:
            skipped_since_log += 1
        optimizer.zero_grad()
        step += 1
        tokens_seen += tokens_per_step
        now = time.perf_counter()
        if t_first is None:
            t_first, first_step = now, step
        if total == 0 and step - first_step >= CALIBRATION_STEPS:
            per_step = (now - t_first) / (step - first_step)
            remaining = tc.minutes * 60 - (elapsed_before + now - t0)
            total = D.broadcast_int(max(step + 1, step + int(remaining / per_step)), info, device)
            progress.total = total
        if step % tc.log_every == 0 or step == total:
            train_loss = D.mean_across_ranks(loss_sum / max(loss_count, 1), info).item()
            if not math.isfinite(train_loss):
                raise UserError(f"training loss became {train_loss} at step {step}; lower train.lr "
                                "(or keep train.nan_guard=true to skip such steps)")
            dt = now - last_log_t
            tok_s = (step - last_log_step) * tokens_per_step / dt if dt > 0 else 0.0
            record = {"step": step, "loss": train_loss, "lr": optimizer.param_groups[-1]["lr"],
                      "grad_norm": grad_norm.item() if grad_norm is not None else None,
                      "tokens": tokens_seen, "tok_per_s": tok_s, "elapsed": elapsed_before + now - t0,
                      "seq_len": seq, "skipped_steps": skipped_since_log}
            record.update(model.extra_metrics())
            if peak:
                flops = model.flops_per_token(seq) * tokens_per_step / info.world_size
                record["mfu"] = flops * (step - last_log_step) / dt / peak
            metrics.log(record)
            extra = f"loss {train_loss:.4f} | lr {record['lr']:.2e} | {tok_s:,.0f} tok/s"
            if "mfu" in record:
                extra += f" | MFU {record['mfu']:.1%}"
            if skipped_since_log:
                extra += f" | skipped {skipped_since_log}"
            progress.update(step - progress.done, extra)
            loss_sum.zero_()
            loss_count, skipped_since_log, last_log_t, last_log_step = 0, 0, now, step
        evaluated = False
        if has_val and tc.eval_every and step % tc.eval_every == 0 and step != total:
            val_loss, evaluated = evaluate(), True
            metrics.log({"step": step, "val_loss": val_loss})
        if tc.save_every and step % tc.save_every == 0 and step != total:
            save(val_loss if evaluated else None)
            last_saved = step
    finished = total > 0 and step >= total
    if finished and has_val:
        val_loss = evaluate()
        metrics.log({"step": step, "val_loss": val_loss})
    if step != last_saved:
        save(val_loss if finished else None)
    metrics.close()
    elapsed = progress.close(f"val loss {val_loss:.4f}" if val_loss is not None else "")
    summary = {"steps": step, "total_steps": total, "finished": finished, "tokens": tokens_seen,
               "elapsed_s": elapsed_before + elapsed, "val_loss": val_loss,
               "tok_per_s": (step - (state or {}).get("step", 0)) * tokens_per_step / max(elapsed, 1e-9),
               "skipped_steps": guard.skipped, "params": model.num_params(), "checkpoint": str(ckpts.latest_link),
               "world_size": info.world_size}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
